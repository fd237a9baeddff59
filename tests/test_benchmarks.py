"""The benchmark suite's structure (never its times): byte accounting, launches per calibration, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import run
from moeq_triton.kernels import quantize_fp8, quantize_nvfp4
from moeq_triton.testing import MoEShape

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

TINY = MoEShape(name="tiny", hidden=64, moe_intermediate=32, experts=4, moe_layers=2)


def output_bytes(results) -> int:
    return sum(t.numel() * t.element_size() for r in results for t in r)


# Bytes written per element and per tensor, stated here from the formats' definitions (not from the code):
# NVFP4 = half a byte of code + one E4M3 scale per 16 elements, a float32 weight_scale_2 per tensor;
# FP8 per tensor = one byte per element, a float32 scale per tensor.
WRITTEN = {"quantize_nvfp4": (1 / 2 + 1 / 16, 4), "quantize_fp8": (1, 4)}


@pytest.mark.parametrize(
    "row, quantize",
    [pytest.param("quantize_nvfp4", quantize_nvfp4, marks=pytest.mark.slow), ("quantize_fp8", quantize_fp8)],
)
def test_bytes_moved_counts_every_input_and_output_byte(row, quantize):
    """The formula behind GB/s equals the format's definition and the bytes the kernels really allocate."""
    weights = run.expert_views(TINY, 2, 4, "cpu")
    read = sum(w.numel() * w.element_size() for w in weights)
    per_element, per_tensor = WRITTEN[row]
    expected = read + int(sum(w.numel() for w in weights) * per_element) + per_tensor * len(weights)
    assert run.bytes_moved(row, weights) == expected
    assert output_bytes(quantize(weights)) == expected - read
    assert run.bytes_moved("grouped_amax", weights) == read


@pytest.mark.parametrize("layers", [1, 2])
def test_calibration_row_one_launch_and_bitwise_equal_to_max(layers):
    """mtq.calibrate with triton_grouped: one launch whatever the number of layers, amaxes equal to max."""
    weights = run.expert_views(TINY, layers, TINY.experts, "cpu")
    row = run.calibration_row(TINY, weights, TINY.experts, "cpu", reps=1, sol=1.0)
    assert row.launches == 1
    assert row.collectives == 0 and row.extra["modelopt_collectives"] == 0  # one process: nothing to reduce
    assert row.tensors == 2 * layers * TINY.experts


@pytest.mark.slow  # a subprocess running the whole --quick table: about 40 s
def test_quick_run_writes_a_complete_table(tmp_path):
    """`python -m benchmarks.run --quick` as CI runs it (torch references on CPU): every row and column."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        check=True,
        cwd=BENCHMARKS.parent,
        env=env,
        timeout=170,
    )
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"grouped_amax", "quantize_nvfp4", "quantize_fp8", "mtq.calibrate weights (triton_grouped)"}
    weights = run.expert_views(run.MODEL_SHAPES[0], 1, 4, "cpu")
    read = sum(w.numel() * w.element_size() for w in weights)
    for name, r in rows.items():  # stated from the formats (WRITTEN), not from run.bytes_moved that wrote them
        per_element, per_tensor = WRITTEN.get(name, (0, 0))
        expected = read + int(sum(w.numel() for w in weights) * per_element) + per_tensor * len(weights)
        assert r["bytes"] == expected, (name, r["bytes"], expected)
        assert r["seconds"] > 0 and r["speed_of_light_s"] > 0, (name, r)
    assert rows["quantize_nvfp4"]["modelopt_s"] and rows["quantize_nvfp4"]["loop_s"]
    assert result["sweep"] and result["copy_bandwidth_bytes_per_s"] > 0
    assert torch.__version__.split("+")[0] in json.dumps(result["versions"])

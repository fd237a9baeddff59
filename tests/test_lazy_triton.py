"""The CPU path never imports triton: ``import moeq_triton`` and ``quantize --device cpu`` (the C loop, or the
torch references without a compiler) run without it, and a machine where ``import triton`` fails quantizes the
same bytes.  Triton is imported by the kernels' ``*_jit`` modules on the first Triton launch only (CUDA, or the
interpreter); importing it costs about 0.1 s of every CPU run (benchmarks/RESULTS.md).

Each case is a fresh process (this one has imported triton long ago: conftest turns the interpreter on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moeq_triton.synthetic import heavy_tailed, qwen3_moe_config, qwen3_moe_layout
from tests.seeds import SEED

TINY = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=128,
    norm_topk_prob=True,
)  # fmt: skip

RUN = """
import sys
if sys.argv[4] == "blocked":
    sys.modules["triton"] = None  # `import triton` raises ImportError, as where triton is missing or broken
import moeq_triton
import moeq_triton.kernels
print("AFTER IMPORT", "triton" in sys.modules, flush=True)
from moeq_triton.cli import main
code = main(["quantize", "--model", sys.argv[1], "--out", sys.argv[2], "--format", sys.argv[3], "--device", "cpu"])
print("EXIT", code, flush=True)
print("AFTER QUANTIZE", sorted(m for m in sys.modules if m == "triton" or m.startswith("triton.")), flush=True)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A one-layer, four-expert Qwen3-MoE checkpoint (written as the default checkpoint is, no transformers)."""
    path = tmp_path_factory.mktemp("lazy") / "tiny"
    path.mkdir()
    gen = torch.Generator().manual_seed(SEED)
    tensors = {
        name: heavy_tailed(shape, gen, torch.bfloat16, scale=0.02) for name, shape in qwen3_moe_layout(TINY).items()
    }
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(qwen3_moe_config(TINY)))
    return path


def quantize(source: Path, out: Path, fmt: str, triton: str, native: str) -> list[str]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "MOEQ_TRITON_NATIVE": native}
    run = subprocess.run(
        [sys.executable, "-c", RUN, str(source), str(out), fmt, triton],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines()


def files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8-block"])
@pytest.mark.parametrize("native", ["1", "0"], ids=["c-loop", "references"])
def test_cpu_quantize_never_imports_triton(tiny, tmp_path, fmt, native):
    importable = quantize(tiny, tmp_path / "a", fmt, "importable", native)
    assert "AFTER IMPORT False" in importable
    assert "EXIT 0" in importable
    assert "AFTER QUANTIZE []" in importable
    blocked = quantize(tiny, tmp_path / "b", fmt, "blocked", native)
    assert "EXIT 0" in blocked, blocked
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_the_check_sees_a_triton_import(tmp_path):
    """The probe itself: a launch that does need triton (the interpreter) is seen importing it, and blocked
    it fails, so the assertions above would catch a CPU path that imported triton."""
    code = (
        "import sys\n"
        "if sys.argv[1] == 'blocked':\n"
        "    sys.modules['triton'] = None\n"
        "import torch\n"
        "from moeq_triton.kernels import grouped_amax\n"
        "grouped_amax([torch.ones(2, 16)])\n"
        "print('triton' in sys.modules)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    seen = subprocess.run([sys.executable, "-c", code, "importable"], capture_output=True, text=True, env=env)
    assert seen.returncode == 0 and seen.stdout.split() == ["True"], seen.stderr[-2000:]
    blocked = subprocess.run([sys.executable, "-c", code, "blocked"], capture_output=True, text=True, env=env)
    assert blocked.returncode != 0 and "import of triton halted" in blocked.stderr, blocked.stderr[-2000:]

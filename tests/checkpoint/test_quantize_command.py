"""`moeq-triton quantize` against ModelOpt's own export of the same model, multi-process runs, memory figure.

Failure behaviour (bad input, faults, signals, a failing rank) is the matrix in test_faults.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
import warnings

import modelopt.torch.quantization as mtq
import pytest
import torch
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM

from moeq_triton.checkpoint.formats import FORMATS
from moeq_triton.checkpoint.quantize import quantize_checkpoint
from moeq_triton.cli import main
from tests.assertions import assert_bitwise_equal, checkpoint_tensors, config_without
from tests.distributed_harness import run_ranks, values
from tests.models import tiny_qwen3_moe

warnings.filterwarnings("ignore", message=".*transformers.*not tested.*")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A tiny Qwen3-MoE saved by transformers into several shards (gate and up of an expert may differ)."""
    path = tmp_path_factory.mktemp("src") / "tiny-qwen3-moe"
    tiny_qwen3_moe(layers=2, experts=4).save_pretrained(path, max_shard_size="60KB")
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    return str(path)


def modelopt_export(source: str, fmt: str, out) -> None:
    """ModelOpt's route: load, mtq.quantize with its weight-only config, export_hf_checkpoint."""
    base = {
        "nvfp4": mtq.W4A16_NVFP4_CFG,
        "fp8": mtq.FP8_DEFAULT_CFG,
        "fp8-per-channel": mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG,
    }
    cfg = copy.deepcopy(base[fmt])
    cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer", "enable": False})
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.config.architectures = ["Qwen3MoeForCausalLM"]
    mtq.quantize(model, cfg)
    export_hf_checkpoint(model, export_dir=out)


@pytest.mark.parametrize(
    "fmt, engine",
    [  # fp8-block, the engines' layout: tests/test_fp8_block.py; nvfp4 interpreted takes about 20 s
        pytest.param(f, "interpreter", marks=[pytest.mark.slow] if f == "nvfp4" else [])
        for f in FORMATS
        if f != "fp8-block"
    ]
    + [("nvfp4", "native"), ("fp8", "native"), ("fp8-per-channel", "native"), ("fp8", "reference")],
)
def test_output_equals_modelopt_export(source, fmt, engine, tmp_path, monkeypatch):
    """Every tensor byte-identical to ModelOpt's export; hf_quant_config and config.json equivalent.

    engine: the Triton kernels (interpreter), what `--device cpu` runs for users (the compiled C loop), or
    the torch references (no C compiler)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if engine == "interpreter" else "0")
    monkeypatch.setenv("MOEQ_TRITON_NATIVE", "0" if engine == "reference" else "1")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert main(["quantize", "--model", source, "--out", str(ours), "--format", fmt, "--device", "cpu"]) == 0
    modelopt_export(source, fmt, theirs)
    a, b = checkpoint_tensors(ours), checkpoint_tensors(theirs)
    assert sorted(a) == sorted(b)
    for name in b:
        assert_bitwise_equal(a[name], b[name], name)
    for config in ("hf_quant_config.json", "config.json"):
        mine = config_without(json.loads((ours / config).read_text()))
        reference = config_without(json.loads((theirs / config).read_text()))
        mine.pop("dtype", None), reference.pop("dtype", None)  # ModelOpt rewrites the loaded dtype
        assert mine == reference, config
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a)
    if fmt == "nvfp4":
        for layer in range(2):
            for e in range(4):
                p = f"model.layers.{layer}.mlp.experts.{e}"
                assert_bitwise_equal(a[f"{p}.gate_proj.weight_scale_2"], a[f"{p}.up_proj.weight_scale_2"], p)


@pytest.mark.slow  # about 15 s (interpreted kernels)
def test_experts_only_keeps_attention(source, tmp_path):
    out = tmp_path / "experts-only"
    assert main(["quantize", "--model", source, "--out", str(out), "--experts-only", "--device", "cpu"]) == 0
    tensors = checkpoint_tensors(out)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.experts.1.down_proj.weight"].dtype == torch.uint8
    excluded = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert "model.layers.1.self_attn.o_proj" in excluded and "model.layers.1.mlp.gate" in excluded


@pytest.mark.slow
def test_console_script_default_model_with_verify(tmp_path):
    """The main job end to end through the installed console script: synthetic default, --verify."""
    env = {**os.environ, "MOEQ_TRITON_CACHE": str(tmp_path / "cache"), "TRITON_INTERPRET": "0"}
    script = os.path.join(os.path.dirname(sys.executable), "moeq-triton")
    run = subprocess.run(
        [script, "quantize", "--out", str(tmp_path / "out"), "--verify", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "SYNTHETIC" in run.stdout and "verify:" in run.stdout
    assert (tmp_path / "out" / "hf_quant_config.json").is_file()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moeq_triton", "quantize", "--device", "cpu", *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"},
    )  # fmt: skip


def assert_clean_failure(run: subprocess.CompletedProcess, fragment: str, out) -> None:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-1500:]
    assert fragment in run.stderr, run.stderr[-1500:]
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}*"))


def copy_checkpoint(source: str, tmp_path):
    target = tmp_path / "broken"
    target.mkdir()
    for f in os.listdir(source):
        (target / f).write_bytes(open(os.path.join(source, f), "rb").read())
    return target


def test_unknown_architecture(source, tmp_path):
    broken = copy_checkpoint(source, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["MysteryForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_failure(cli("--model", str(broken), "--out", str(out)), "supported: Qwen3MoeForCausalLM", out)


@pytest.mark.slow  # about 16 s: an interrupted run and a full rerun
def test_interrupted_run_leaves_nothing_complete_and_rerun_finishes(source, tmp_path, monkeypatch):
    """A failure in the middle leaves only a hidden partial directory; the next run replaces it."""
    import moeq_triton.checkpoint.quantize as model_free

    out = tmp_path / "out"
    original = model_free.AtomicCheckpointDir.open_shard
    calls = []

    def failing(self, file, layout):
        calls.append(file)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, file, layout)

    monkeypatch.setattr(model_free.AtomicCheckpointDir, "open_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(source, out, FORMATS["nvfp4"], max_shard_bytes=20_000)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    monkeypatch.setattr(model_free.AtomicCheckpointDir, "open_shard", original)
    quantize_checkpoint(source, out, FORMATS["nvfp4"], max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()


def _two_process_run(rank: int, world: int, source: str, out: str) -> bool:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    from moeq_triton.checkpoint.formats import FORMATS
    from moeq_triton.checkpoint.quantize import quantize_checkpoint

    quantize_checkpoint(source, out, FORMATS["nvfp4"], max_shard_bytes=20_000)
    return True


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one(source, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    quantize_checkpoint(source, one, FORMATS["nvfp4"], max_shard_bytes=20_000)
    assert values(run_ranks(_two_process_run, 2, source, str(two))) == [True, True]
    files = sorted(os.listdir(one))
    assert files == sorted(os.listdir(two)) and len([f for f in files if f.endswith(".safetensors")]) > 2
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f


def test_size_arguments_and_missing_cuda(capsys):
    from moeq_triton.cli import byte_size

    sizes = [byte_size(text) for text in ("2GB", "500MB", "64MiB", "123")]
    assert sizes == [2 << 30, 500 << 20, 64 << 20, 123]
    if not torch.cuda.is_available():
        assert main(["quantize", "--device", "cuda", "--out", "unused"]) == 1
        assert "no CUDA device" in capsys.readouterr().err


def test_memory_sampler_separates_heap_from_mapped_files(tmp_path):
    """The heap figure (what --batch-size bounds) must not count a mapped source file, and must count
    the heap: map and touch a 64 MiB file, then allocate and touch 64 MiB."""
    import mmap

    from moeq_triton.memory import MemorySampler, resident

    size = 64 << 20
    path = tmp_path / "mapped.bin"
    path.write_bytes(bytes(range(256)) * (size // 256))
    anonymous, mapped = resident()
    with MemorySampler() as peak, open(path, "rb") as file:
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            touched = sum(view[i] for i in range(0, size, 4096))
            time.sleep(0.2)  # the sampler reads /proc every 10 ms
    assert touched == 0  # byte 0 of every page
    assert peak.file_backed - mapped >= size * 0.9, (peak, mapped)
    assert peak.anonymous - anonymous < size * 0.25, (peak, anonymous)
    anonymous = resident()[0]
    with MemorySampler() as peak:
        heap = torch.ones(size // 4)
        time.sleep(0.2)
        del heap
    assert peak.anonymous - anonymous >= size * 0.9, (peak, anonymous)


def test_memory_figure_printed_apart_from_mapped_files(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["quantize", "--model", source, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    pattern = r"peak memory: \d+ MiB heap \(anonymous: the batches in flight, .* --batch-size: .*\); file-backed pages"
    assert re.search(pattern + r" \(mapped source shards, libraries\) up to \d+ MiB", printed), printed[-600:]

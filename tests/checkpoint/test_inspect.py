"""`moeq-triton inspect`: each problem that gives wrong answers is named and exits 1; a sound checkpoint exits 0.
Also the end-of-run warning of `quantize --format fp8 / fp8-per-channel` on a MoE checkpoint."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeq_triton.checkpoint.checks import inspect_checkpoint
from moeq_triton.cli import main
from tests.models import tiny_qwen3_moe

warnings.filterwarnings("ignore", message=".*transformers.*not tested.*")

EXPERT = "model.layers.1.mlp.experts.2"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3-MoE source (several shards) and our nvfp4 / fp8 / fp8-block outputs of it (the CPU
    engines users get: C loop and torch references; the Triton path is covered by the kernel tests)."""
    root = tmp_path_factory.mktemp("inspect")
    tiny_qwen3_moe(layers=2, experts=4).save_pretrained(root / "source", max_shard_size="60KB")
    out = {"source": root / "source"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        for fmt in ("nvfp4", "fp8", "fp8-block"):
            out[fmt] = root / fmt
            args = ["quantize", "--model", str(root / "source"), "--out", str(out[fmt]), "--format", fmt]
            assert main([*args, "--device", "cpu"]) == 0
    return out


@pytest.fixture(autouse=True)
def cpu_engines(monkeypatch):
    """The non-finite pass on the CPU engines (C loop / torch) unless a test asks for the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def mutated(checkpoints, fmt: str, tmp_path: Path, edit) -> Path:
    """A copy of a checkpoint whose tensors went through ``edit(tensors of one shard)``, index kept consistent."""
    copy = tmp_path / f"{fmt}-edited"
    shutil.copytree(checkpoints[fmt], copy)
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(copy / file)
        before = set(tensors)
        if edit(tensors):
            save_file(tensors, copy / file, {"format": "pt"})
            for gone in before - set(tensors):
                del index["weight_map"][gone]
    index_path.write_text(json.dumps(index))
    return copy


def run(path: Path, capsys) -> tuple[int, str]:
    code = main(["inspect", str(path), "--device", "cpu"])
    return code, capsys.readouterr().out


def test_correct_nvfp4_checkpoint_passes(checkpoints, capsys):
    """Our NVFP4 output: format from hf_quant_config.json, counts per module kind, every expert's gate/up
    share weight_scale_2, verdicts printed, exit 0."""
    code, out = run(checkpoints["nvfp4"], capsys)
    assert code == 0, out
    assert "W4A16_NVFP4 (from hf_quant_config.json), MoE" in out
    assert "8/8 experts share weight_scale_2" in out
    assert "mlp.experts.*.gate_proj" in out and "--moe-runner-backend marlin" in out
    report = inspect_checkpoint(checkpoints["nvfp4"])
    assert report.counts["mlp.experts.*.down_proj"] == {"quantized": 8}
    assert report.counts["mlp.gate"] == {"kept": 2}


def test_source_checkpoint_passes(checkpoints, capsys):
    code, out = run(checkpoints["source"], capsys)
    assert code == 0, out
    assert "unquantized" in out


def test_differing_gate_up_scales_are_named(checkpoints, tmp_path, capsys):
    """vLLM keeps the gate's weight_scale_2 for both halves of w13: a differing up scale is wrong output."""

    def edit(tensors):
        name = f"{EXPERT}.up_proj.weight_scale_2"
        if name in tensors:
            tensors[name] = tensors[name] * 2
            return True
        return False

    code, out = run(mutated(checkpoints, "nvfp4", tmp_path, edit), capsys)
    assert code == 1, out
    assert f"error: {EXPERT}: gate and up weight_scale_2 differ" in out
    assert "7/8 experts share" in out


@pytest.mark.parametrize("engine", ["cpu", "interpreter"])
def test_nan_in_a_kept_tensor_is_named(checkpoints, engine, tmp_path, capsys, monkeypatch):
    """Also through the grouped Triton amax (interpreter): its error names one tensor, the pass names all."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if engine == "interpreter" else "0")

    def edit(tensors):
        if "model.layers.0.mlp.gate.weight" in tensors:
            tensors["model.layers.0.mlp.gate.weight"][1, 3] = float("nan")
            tensors["model.norm.weight"][0] = float("inf")
            return True
        return False

    code, out = run(mutated(checkpoints, "nvfp4", tmp_path, edit), capsys)
    assert code == 1, out
    assert "error: model.layers.0.mlp.gate.weight (BF16) holds NaN or Inf" in out
    assert "error: model.norm.weight (BF16) holds NaN or Inf" in out


def test_nan_code_in_fp8_weight_is_named(checkpoints, tmp_path, capsys):
    """The FP8 NaN byte (0x7F) in a quantized weight: the pass reads codes as well as kept tensors."""
    name = f"{EXPERT}.down_proj.weight"

    def edit(tensors):
        if name in tensors:
            tensors[name].view(torch.uint8)[0, 0] = 0x7F
            return True
        return False

    code, out = run(mutated(checkpoints, "fp8-block", tmp_path, edit), capsys)
    assert code == 1, out
    assert f"error: {name} (F8_E4M3) holds NaN or Inf" in out


def test_missing_weight_scale_is_named(checkpoints, tmp_path, capsys):
    def edit(tensors):
        return tensors.pop(f"{EXPERT}.down_proj.weight_scale", None) is not None

    code, out = run(mutated(checkpoints, "nvfp4", tmp_path, edit), capsys)
    assert code == 1, out
    assert f"error: {EXPERT}.down_proj.weight is quantized (U8) but {EXPERT}.down_proj.weight_scale is missing" in out


def test_misshapen_block_scale_is_named(checkpoints, tmp_path, capsys):
    """A weight_scale_inv whose block grid does not fit its weight (1x2 for a 64x32 down_proj, one block):
    the engines size the scale parameter from the weight and would reject or misread it."""
    name = f"{EXPERT}.down_proj.weight_scale_inv"

    def edit(tensors):
        if name in tensors:
            tensors[name] = torch.ones(1, 2)
            return True
        return False

    code, out = run(mutated(checkpoints, "fp8-block", tmp_path, edit), capsys)
    assert code == 1, out
    assert f"error: {name} has shape [1, 2]: 1 values expected for FP8_BLOCK_SCALES and weight shape [64, 32]" in out


def test_our_fp8_checkpoint_of_a_moe_is_a_problem(checkpoints, capsys):
    code, out = run(checkpoints["fp8"], capsys)
    assert code == 1, out
    assert "error: FP8 of a MoE model: no engine serves it correctly" in out
    assert "attention activations quantize to zero" in out


def test_fp8_block_checkpoint_passes_and_warns_about_block_shapes(checkpoints, capsys):
    """Sound bytes (exit 0), but this tiny model's 32-row experts break the engines' 128-row rule: warned."""
    code, out = run(checkpoints["fp8-block"], capsys)
    assert code == 0, out
    assert "FP8_BLOCK_SCALES (from config.json), MoE" in out
    assert "warning: vLLM and SGLang refuse FP8 blocks" in out and "gate_proj.weight has 32 rows" in out


def test_unlisted_bf16_linear_is_named(checkpoints, tmp_path, capsys):
    """A linear left bf16 but not listed as kept: the engines would build a quantized layer for it."""
    name = "model.layers.0.self_attn.o_proj.weight"

    def edit(tensors):
        if name in tensors:
            tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.bfloat16)
            tensors.pop(name + "_scale_inv")
            return True
        return False

    code, out = run(mutated(checkpoints, "fp8-block", tmp_path, edit), capsys)
    assert code == 1, out
    assert f"error: {name} is stored BF16 but model.layers.0.self_attn.o_proj is not listed as kept" in out


@pytest.mark.parametrize("fmt", ["fp8", "fp8-per-channel", "nvfp4", "fp8-block"])
def test_end_of_run_warning(checkpoints, fmt, tmp_path, capsys):
    """`--format fp8` / `fp8-per-channel` on a MoE checkpoint end with one warning that names the engine
    behaviour and suggests fp8-block or nvfp4; the formats the engines serve end without it."""
    args = ["quantize", "--model", str(checkpoints["source"]), "--out", str(tmp_path / "o"), "--format", fmt]
    assert main([*args, "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    if fmt.startswith("fp8") and fmt != "fp8-block":
        assert err.count("warning: no engine serves this") == 1
        assert "--format fp8-block" in err and "--format nvfp4" in err
        assert ("runs but wrong" if fmt == "fp8" else "refused") in err
    elif fmt == "fp8-block":  # the tiny experts (32 rows) break the engines' 128-row rule: said, as inspect says it
        assert err.count("warning") == 1 and "warning: vLLM and SGLang refuse FP8 blocks at load" in err, err
    else:
        assert "warning" not in err


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8-block"])
def test_verify_reuses_inspect(checkpoints, fmt, tmp_path, capsys):
    """`quantize --verify` runs inspect's checkpoint checks and prints its warnings: an all-zero expert weight,
    which ModelOpt's NVFP4 math turns into NaN block scales (amax 0 -> 0/0), is written as exact zeros and
    passes (issue 23); fp8-block gives a zero block scale 1.0 and passes, with inspect's block-shape warning."""
    zeroed = tmp_path / "source-zero"
    shutil.copytree(checkpoints["source"], zeroed)
    name = f"{EXPERT}.down_proj.weight"
    file = json.loads((zeroed / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(zeroed / file)
    tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, zeroed / file, {"format": "pt"})
    args = ["quantize", "--model", str(zeroed), "--out", str(tmp_path / "o"), "--format", fmt, "--verify"]
    code = main([*args, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "verify:" in captured.out and "holds NaN" not in captured.err
    if fmt == "fp8-block":
        assert "moeq-triton: verify: warning: vLLM and SGLang refuse FP8 blocks at load" in captured.err
    else:
        assert "warning" not in captured.err


def test_readme_table_is_the_serving_table():
    """The README's format x engine table is generated from the data inspect and the warning use."""
    from moeq_triton.checkpoint.serving import markdown_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert markdown_table() in readme


# ---------------------------------------------------------------- issue 23: one line, no traceback, nothing missed


def with_text(checkpoints, tmp_path: Path, file: str, text: str) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(checkpoints["nvfp4"], copy)
    (copy / file).write_text(text)
    return copy


def config_with(checkpoints, tmp_path: Path, quantization_config) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(checkpoints["nvfp4"], copy)
    (copy / "hf_quant_config.json").unlink()
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"quantization_config": quantization_config}))
    return copy


CONFIG_ROWS = {
    "hf-quant-config-invalid-json": (
        lambda c, t: with_text(c, t, "hf_quant_config.json", "{oops"),
        "hf_quant_config.json: invalid JSON",
    ),
    "hf-quant-config-a-list": (
        lambda c, t: with_text(c, t, "hf_quant_config.json", "[]"),
        "hf_quant_config.json: expected a JSON object, found list",
    ),
    "quantization-a-list": (
        lambda c, t: with_text(c, t, "hf_quant_config.json", '{"quantization": []}'),
        'hf_quant_config.json: "quantization" is a list, expected an object',
    ),
    "quantization-config-a-string": (
        lambda c, t: config_with(c, t, "fp8"),
        "config.json: quantization_config is a str, expected an object",
    ),
    "exclude-modules-not-a-list": (
        lambda c, t: with_text(c, t, "hf_quant_config.json", '{"quantization": {"exclude_modules": 3}}'),
        "hf_quant_config.json: exclude_modules is not a list of module names",
    ),
}


@pytest.mark.parametrize("row", list(CONFIG_ROWS))
def test_odd_quantization_configs_are_one_line(row, checkpoints, tmp_path, capsys):
    make, says = CONFIG_ROWS[row]
    path = make(checkpoints, tmp_path)
    code = main(["inspect", str(path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and says in err and len(err.strip().splitlines()) == 1, err


def test_zero_dim_u8_weight_is_named(checkpoints, tmp_path, capsys):
    name = f"{EXPERT}.up_proj.weight"
    path = mutated(
        checkpoints,
        "nvfp4",
        tmp_path,
        lambda t: name in t and t.update({name: torch.tensor(7, dtype=torch.uint8)}) is None,
    )
    code, out = run(path, capsys)
    assert code == 1 and f"{name} is stored U8 with no dimensions" in out, out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e5m2])
def test_nan_in_f64_and_e5m2_tensors_is_named(checkpoints, dtype, tmp_path, capsys):
    """The promise is "NaN/Inf in any tensor": F64 and F8_E5M2 included (F64 was missed)."""
    name = "model.layers.0.extra_table"
    value = torch.tensor([1.0, float("nan"), 2.0]).to(dtype)

    def add(tensors: dict) -> bool:
        if "model.norm.weight" not in tensors:
            return False
        tensors[name] = value
        return True

    path = mutated(checkpoints, "nvfp4", tmp_path, add)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = index["weight_map"]["model.norm.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out = run(path, capsys)
    assert code == 1 and f"{name} ({'F64' if dtype == torch.float64 else 'F8_E5M2'}) holds NaN or Inf" in out, out


def test_dtypes_outside_the_quantized_set_are_read(checkpoints, tmp_path, capsys):
    """BOOL, I16, U16, U32 and finite F8_E5M2 tensors: no KeyError, no finding."""
    extra = {
        "model.layers.0.mask": torch.ones(4, dtype=torch.bool),
        "model.layers.0.ids": torch.arange(4).to(torch.int16),
        "model.layers.0.hash16": torch.arange(4).to(torch.uint16),
        "model.layers.0.hash32": torch.arange(4).to(torch.uint32),
        "model.layers.0.table": torch.ones(4, dtype=torch.float8_e5m2),
    }

    def add(tensors: dict) -> bool:
        if "model.norm.weight" not in tensors:
            return False
        tensors.update(extra)
        return True

    path = mutated(checkpoints, "nvfp4", tmp_path, add)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(extra, index["weight_map"]["model.norm.weight"])
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out = run(path, capsys)
    assert code == 0, out


def test_modelopt_bytes_of_an_all_zero_weight_are_named(checkpoints, tmp_path, capsys):
    """What ModelOpt writes for an all-zero NVFP4 weight (weight_scale_2 0, block scales NaN, codes 0x77) is
    a NaN finding; our encoding of the same weight is not (tests/checkpoint/test_faults.py)."""
    name = f"{EXPERT}.gate_proj.weight"

    def modelopt_zero(tensors: dict) -> bool:
        if name + "_scale" not in tensors:
            return False
        tensors[name + "_scale"] = torch.full_like(tensors[name + "_scale"].view(torch.uint8), 0xFF).view(
            torch.float8_e4m3fn
        )
        return True

    code, out = run(mutated(checkpoints, "nvfp4", tmp_path, modelopt_zero), capsys)
    assert code == 1 and f"{name}_scale (F8_E4M3) holds NaN or Inf" in out, out

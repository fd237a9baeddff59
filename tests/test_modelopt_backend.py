"""The triton_grouped calibrator inside real mtq.quantize: parity with ModelOpt's max, O(1) launches."""

from __future__ import annotations

import copy
import os
import warnings

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
import pytest
import torch
from assertions import assert_bitwise_equal
from grouped_linear_standin import GroupedMoEStandIn
from modelopt.torch.export import export_hf_checkpoint
from modelopt.torch.quantization.calib import MaxCalibrator
from moeq_triton.kernels import launch_counts, reset_launch_counts
from safetensors.torch import load_file
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import moeq_triton
from moeq_triton.calibration import scale_family

warnings.filterwarnings("ignore", message=".*transformers.*not tested.*")


def heavy_tailed_(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) ** 3).to(p.dtype))
    return model


def tiny_qwen3_moe(layers: int = 2, experts: int = 4, seed: int = 0) -> nn.Module:
    cfg = Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=experts,
        num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, vocab_size=128,
    )  # fmt: skip
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    return heavy_tailed_(Qwen3MoeForCausalLM(cfg).to(torch.bfloat16), seed)


def tiny_qwen3_dense(seed: int = 0) -> nn.Module:
    cfg = Qwen3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, vocab_size=128,
    )  # fmt: skip
    cfg.architectures = ["Qwen3ForCausalLM"]
    return heavy_tailed_(Qwen3ForCausalLM(cfg).to(torch.bfloat16), seed)


def without_inputs(cfg: dict) -> dict:
    """ModelOpt's own config with input quantizers disabled: the weight-only reference."""
    cfg = copy.deepcopy(cfg)
    cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer", "enable": False})
    return cfg


PAIRS = {
    "nvfp4": (moeq_triton.NVFP4_WEIGHT_ONLY_CFG, mtq.W4A16_NVFP4_CFG),
    "fp8": (moeq_triton.FP8_WEIGHT_ONLY_CFG, without_inputs(mtq.FP8_DEFAULT_CFG)),
    "fp8-per-channel": (
        moeq_triton.FP8_PER_CHANNEL_WEIGHT_ONLY_CFG,
        without_inputs(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG),
    ),
}


def amax_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.endswith("amax")}


def assert_same_amaxes(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = amax_buffers(ours), amax_buffers(theirs)
    assert a.keys() == b.keys()
    assert any("weight_quantizer" in n for n in a), "no weight quantizer was calibrated"
    for name in a:
        assert_bitwise_equal(a[name], b[name], name)


def assert_same_export(ours: nn.Module, theirs: nn.Module, tmp_path) -> None:
    for tag, model in (("ours", ours), ("theirs", theirs)):
        export_hf_checkpoint(model, export_dir=tmp_path / tag)
    files = sorted(f for f in os.listdir(tmp_path / "theirs") if f.endswith(".safetensors"))
    assert files and files == sorted(f for f in os.listdir(tmp_path / "ours") if f.endswith(".safetensors"))
    for f in files:
        a, b = load_file(tmp_path / "ours" / f), load_file(tmp_path / "theirs" / f)
        assert a.keys() == b.keys()
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{f}:{key}")
    for config in ("hf_quant_config.json", "config.json"):
        assert (tmp_path / "ours" / config).read_text() == (tmp_path / "theirs" / config).read_text()


@pytest.mark.parametrize("fmt", list(PAIRS))
@pytest.mark.parametrize("build", [tiny_qwen3_dense, tiny_qwen3_moe], ids=["dense", "qwen3-moe"])
def test_parity_with_modelopt_max_and_identical_export(fmt, build, tmp_path):
    """Every weight amax and every exported byte equals ModelOpt's max calibrator on the same model."""
    ours_cfg, theirs_cfg = PAIRS[fmt]
    ours, theirs = build(), build()
    mtq.quantize(ours, ours_cfg)
    mtq.quantize(theirs, theirs_cfg)
    assert_same_amaxes(ours, theirs)
    assert_same_export(ours, theirs, tmp_path)


def test_every_expert_of_grouped_linear_is_calibrated():
    """The seed failure (one amax for all TE experts, or none) cannot happen: amax_i == max|W_i|."""
    model = GroupedMoEStandIn(layers=2, experts=6)
    heavy_tailed_(model)
    for i, p in enumerate(model.parameters()):
        p.data *= 1 + i  # distinct magnitudes: a mis-assigned expert cannot pass
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    for name, module in model.named_modules():
        if hasattr(module, "num_gemms"):
            for i in range(module.num_gemms):
                expected = getattr(module, f"weight{i}").abs().amax()
                assert_bitwise_equal(module.weight_quantizer[i].amax, expected, f"{name} expert {i}")


def test_shared_mode_takes_max_over_experts_of_one_linear():
    model = GroupedMoEStandIn(layers=2, experts=5)
    heavy_tailed_(model)
    cfg = copy.deepcopy(moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    for entry in cfg["quant_cfg"]:
        if "cfg" in entry and entry["cfg"].get("calibrator") == moeq_triton.CALIBRATOR:
            entry["cfg"]["calibrator"] = moeq_triton.CALIBRATOR_SHARED
    mtq.quantize(model, cfg)
    for name, module in model.named_modules():
        if hasattr(module, "num_gemms"):
            expected = torch.stack([getattr(module, f"weight{i}").abs().amax() for i in range(module.num_gemms)])
            for i in range(module.num_gemms):
                assert_bitwise_equal(module.weight_quantizer[i].amax, expected.amax(), f"{name} expert {i}")
    fc1 = model.layers[0].mlp.experts.linear_fc1.weight_quantizer[0].amax
    fc1_next_layer = model.layers[1].mlp.experts.linear_fc1.weight_quantizer[0].amax
    assert not torch.equal(fc1, fc1_next_layer), "layers must not share a scale"


def test_pre_047_single_shared_quantizer_gets_max_over_experts():
    """Before 0.47 TE GroupedLinear had one quantizer for all experts: it sees every expert's weight."""
    model = GroupedMoEStandIn(layers=1, experts=4, shared_quantizer=True)
    heavy_tailed_(model)
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    fc1 = model.layers[0].mlp.experts.linear_fc1
    expected = torch.stack([getattr(fc1, f"weight{i}").abs().amax() for i in range(4)]).amax()
    assert_bitwise_equal(fc1.weight_quantizer.amax, expected, "shared quantizer")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformer_engine") is None,
    reason="Transformer Engine is not installable on CPU machines here; runs wherever TE imports",
)
def test_real_te_grouped_linear():
    import transformer_engine.pytorch as te

    layer = te.GroupedLinear(4, 32, 16, bias=False, params_dtype=torch.bfloat16)
    mtq.quantize(layer, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    for i in range(4):
        expected = getattr(layer, f"weight{i}").abs().amax()
        assert_bitwise_equal(layer.weight_quantizer[i].amax, expected, f"expert {i}")


@pytest.mark.parametrize(("layers", "experts"), [(2, 4), (16, 4), (2, 128)])
def test_launches_do_not_grow_with_layers_or_experts(layers, experts, monkeypatch):
    """O(1): one amax launch for the whole model, and ModelOpt's MaxCalibrator.collect is never called."""
    calls = []
    original = MaxCalibrator.collect
    monkeypatch.setattr(MaxCalibrator, "collect", lambda self, x: (calls.append(1), original(self, x))[1])
    model = GroupedMoEStandIn(layers=layers, experts=experts, hidden=16, ffn=16).to(torch.bfloat16)
    reset_launch_counts()
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    assert launch_counts() == {"amax": 1}
    assert calls == []
    assert len(moeq_triton.calibration_stats()) == layers * 2 * experts


def test_save_restore_round_trip(tmp_path):
    """mto.save / mto.restore of a model quantized with triton_grouped (the registration is in place)."""
    model = tiny_qwen3_moe()
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    assert "triton_grouped" in repr(mto.modelopt_state(model))
    mto.save(model, tmp_path / "model.pt")
    restored = mto.restore(tiny_qwen3_moe(seed=1), tmp_path / "model.pt")
    saved = {k: v for k, v in model.state_dict().items() if k.endswith("_amax")}
    loaded = {k: v for k, v in restored.state_dict().items() if k.endswith("_amax")}
    assert saved.keys() == loaded.keys() and saved
    for key in saved:
        assert_bitwise_equal(loaded[key], saved[key], key)


def test_misspelled_calibrator_is_still_rejected():
    cfg = copy.deepcopy(moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    cfg["quant_cfg"][1]["cfg"]["calibrator"] = "triton_grupped"
    with pytest.raises(Exception, match="calibrator"):
        mtq.quantize(tiny_qwen3_dense(), cfg)


def test_registration_is_idempotent():
    moeq_triton.register()
    moeq_triton.register()
    model = tiny_qwen3_dense()
    mtq.quantize(model, moeq_triton.FP8_WEIGHT_ONLY_CFG)
    assert amax_buffers(model)


def test_nan_weight_names_the_module():
    model = tiny_qwen3_moe()
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.down_proj_weight_quantizers\.2"):
        mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)


def test_quantizer_without_weight_is_reported():
    """A module whose iter_weights_for_calibration() skips a weight: a warning names the quantizer."""
    model = GroupedMoEStandIn(layers=1, experts=3)
    del model.layers[0].mlp.experts.linear_fc2.weight2  # the stand-in then yields no weight for expert 2
    with pytest.warns(UserWarning, match=r"linear_fc2\.weight_quantizer\.2"):
        mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    rows = {r.quantizer: r for r in moeq_triton.calibration_stats()}
    assert rows["layers.0.mlp.experts.linear_fc2.weight_quantizer.2"].amax is None


def test_scale_family_drops_only_the_expert_index():
    assert scale_family("decoder.layers.3.mlp.experts.linear_fc1.weight_quantizer.7") == (
        "decoder.layers.3.mlp.experts.linear_fc1.weight_quantizer.*"
    )
    assert scale_family("model.layers.3.mlp.experts.gate_up_proj_weight_quantizers.7") == (
        "model.layers.3.mlp.experts.gate_up_proj_weight_quantizers.*"
    )
    assert scale_family("decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight_quantizer") == (
        "decoder.layers.3.mlp.experts.local_experts.*.linear_fc2.weight_quantizer"
    )
    assert scale_family("model.layers.3.self_attn.q_proj.weight_quantizer") == (
        "model.layers.3.self_attn.q_proj.weight_quantizer"
    )


def test_failed_pass_leaves_nothing_pending(monkeypatch):
    """An error midway through ModelOpt's weight loop must not leak records into the next calibration."""
    from grouped_linear_standin import QuantGroupedLinearStandIn

    original = QuantGroupedLinearStandIn.iter_weights_for_calibration

    def fails_after_one(self):
        yield next(iter(original(self)))
        raise RuntimeError("injected failure")

    monkeypatch.setattr(QuantGroupedLinearStandIn, "iter_weights_for_calibration", fails_after_one)
    with pytest.raises(RuntimeError, match="injected failure"):
        mtq.quantize(GroupedMoEStandIn(layers=1, experts=2), moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    model = GroupedMoEStandIn(layers=1, experts=2)
    monkeypatch.undo()
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)  # a clean pass after the failed one
    assert len(moeq_triton.calibration_stats()) == 4


def test_light_import_then_registration_after_modelopt_import():
    """`import moeq_triton` alone loads no ModelOpt; importing ModelOpt later still registers the name."""
    import subprocess
    import sys

    code = (
        "import sys, moeq_triton\n"
        "assert not any(m.startswith('modelopt') for m in sys.modules), 'moeq_triton imported ModelOpt'\n"
        "from modelopt.torch.quantization.config import QuantizerAttributeConfig\n"
        "QuantizerAttributeConfig(calibrator='triton_grouped')\n"
        "print('registered')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "registered" in run.stdout, run.stderr[-2000:]

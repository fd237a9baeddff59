"""The triton_grouped calibrator inside real mtq.quantize: parity with ModelOpt's max, O(1) launches."""

from __future__ import annotations

import copy
import warnings

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
import pytest
import torch
from modelopt.torch.quantization import utils as qutils
from modelopt.torch.quantization.calib import MaxCalibrator

import moeq_triton
from moeq_triton.kernels import launch_counts, reset_launch_counts
from moeq_triton.modelopt.calibrator import TritonGroupedCalibrator, reduction_view, shared_scale_group
from moeq_triton.modelopt.weight_calibration import LAST_PATH
from tests.assertions import assert_bitwise_equal
from tests.calibration_models import (
    amax_buffers,
    assert_same_amaxes,
    assert_same_export,
    assert_same_modelopt_state,
    assert_same_quantizer_attributes,
    assert_same_shared_states,
    assert_save_restore,
    heavy_tailed_,
    per_expert_qwen3_moe,
    tiny_qwen3_dense,
    tiny_qwen3_moe,
    token_loop,
    with_calibrator,
    without_inputs,
)
from tests.families import llama4_text
from tests.grouped_linear_standin import PER_EXPERT_QUANTIZERS, GroupedMoEStandIn

warnings.filterwarnings("ignore", message=".*transformers.*not tested.*")

per_expert_te_quantizers = pytest.mark.skipif(
    not PER_EXPERT_QUANTIZERS,
    reason="ModelOpt < 0.47 has one weight quantizer per TE GroupedLinear, no GroupedQuantizer "
    "(that case: test_pre_047_single_shared_quantizer_gets_max_over_experts)",
)
needs_shared_states = pytest.mark.skipif(
    not hasattr(qutils, "SharedQuantState"),
    reason="ModelOpt 0.45 has no shared q/k/v and gate/up weight-amax states",
)

PAIRS = {
    "nvfp4": (moeq_triton.NVFP4_WEIGHT_ONLY_CFG, mtq.W4A16_NVFP4_CFG),
    "fp8": (moeq_triton.FP8_WEIGHT_ONLY_CFG, without_inputs(mtq.FP8_DEFAULT_CFG)),
    "fp8-per-channel": (
        moeq_triton.FP8_PER_CHANNEL_WEIGHT_ONLY_CFG,
        without_inputs(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG),
    ),
}
BUILDERS = {"dense": tiny_qwen3_dense, "qwen3-moe": tiny_qwen3_moe, "per-expert": per_expert_qwen3_moe}


@pytest.mark.parametrize("fmt", list(PAIRS))
@pytest.mark.parametrize("model", list(BUILDERS))
def test_whole_model_path_leaves_what_modelopt_max_leaves(fmt, model, tmp_path):
    """Without a forward loop our whole-model path runs, and leaves every bit ModelOpt's max leaves:
    each _amax (value, dtype, shape), every quantizer attribute (flags, _input_dtype of the disabled
    quantizers ModelOpt feeds), mto.modelopt_state (our calibrator's name aside) and the bytes of
    ModelOpt's export_hf_checkpoint.  Fused 3-D experts, one nn.Linear per expert, and a dense model.
    The reference is the same config with "max" (the ready configs drop the inputs' attributes)."""
    ours_cfg = PAIRS[fmt][0]
    theirs_cfg = with_calibrator(ours_cfg, "max")
    ours, theirs = BUILDERS[model](), BUILDERS[model]()
    reset_launch_counts()
    mtq.quantize(ours, ours_cfg)
    assert (LAST_PATH.path, LAST_PATH.reason) == ("whole-model", None)
    # one launch per kind: fused experts are taken whole as the rows of their stacked parameter
    expected = {"row_amax": 1} if fmt == "fp8-per-channel" else {"amax": 1}
    if model == "qwen3-moe" and fmt != "fp8-per-channel":
        expected["row_amax"] = 1
    assert launch_counts() == expected
    mtq.quantize(theirs, theirs_cfg)
    assert_same_amaxes(ours, theirs)
    assert_same_quantizer_attributes(ours, theirs)
    assert_same_shared_states(ours, theirs)
    assert_same_modelopt_state(ours, theirs, moeq_triton.CALIBRATOR)
    assert_same_export(ours, theirs, tmp_path)


def test_second_calibration_reuses_the_shared_states_as_max_does():
    """A second mtq.calibrate finds the q/k/v and gate/up states of the first: ModelOpt's attach keeps them
    (no duplicate) and populate refills them; ours leaves the same states, amaxes and modelopt_state."""
    ours, theirs = per_expert_qwen3_moe(), per_expert_qwen3_moe()
    mtq.quantize(ours, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    mtq.quantize(theirs, with_calibrator(moeq_triton.NVFP4_WEIGHT_ONLY_CFG, "max"))
    for model in (ours, theirs):
        with torch.no_grad():
            model.model.layers[0].mlp.experts[1].up_proj.weight.mul_(3)
        mtq.calibrate(model, algorithm="max")
        if model is ours:
            assert (LAST_PATH.path, LAST_PATH.reason) == ("whole-model", None)
    assert_same_amaxes(ours, theirs)
    assert_same_shared_states(ours, theirs)
    assert_same_quantizer_attributes(ours, theirs)
    assert_same_modelopt_state(ours, theirs, moeq_triton.CALIBRATOR)


@pytest.mark.parametrize("model", ["qwen3-moe", "per-expert"])
def test_forward_loop_path_leaves_what_modelopt_max_leaves(model, tmp_path):
    """With activation quantizers and a forward loop, ModelOpt's max_calibrate runs with our grouped
    weight pass inside; the forward then feeds the weights again.  Same bits as max throughout."""
    theirs_cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)  # inputs enabled: they need the loop
    ours_cfg = with_calibrator(theirs_cfg, moeq_triton.CALIBRATOR)
    ours, theirs = BUILDERS[model](), BUILDERS[model]()
    reset_launch_counts()
    mtq.quantize(ours, ours_cfg, forward_loop=token_loop())
    assert LAST_PATH.path == "modelopt" and "forward loop" in LAST_PATH.reason
    assert set(launch_counts().values()) == {1}  # one grouped launch per kind (fused experts: rows)
    mtq.quantize(theirs, theirs_cfg, forward_loop=token_loop())
    assert any("input_quantizer" in n for n in amax_buffers(ours)), "the loop calibrated no input"
    assert_same_amaxes(ours, theirs)
    assert_same_quantizer_attributes(ours, theirs)
    assert_same_modelopt_state(ours, theirs, moeq_triton.CALIBRATOR)
    assert_same_export(ours, theirs, tmp_path)


INPUTS_ON = {
    "nvfp4": mtq.W4A16_NVFP4_CFG,
    "fp8": mtq.FP8_DEFAULT_CFG,
    "fp8-per-channel": mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG,
}


@pytest.mark.parametrize("loop", [False, True], ids=["weights-only", "forward-loop"])
@pytest.mark.parametrize("fmt", list(PAIRS))
def test_llama4_transposed_stacked_experts_leave_what_max_leaves(fmt, loop, tmp_path):
    """Llama-4's experts hold gate_up_proj / down_proj stacked [E, in, out], one quantizer each, and
    ModelOpt feeds that quantizer the transposed view [E, out, in] (last-dim stride != 1, which the
    kernels refuse).  We reduce the contiguous parameter behind the view, without a copy: the same
    _amax as max (0-dim for NVFP4 and FP8, [E, 1, 1] per expert for FP8 per-channel, whose axis 0
    keeps the expert dim of the 3-D view), attributes, state and export bytes.  With a forward loop
    (ModelOpt's configs, inputs on) ModelOpt's max_calibrate runs with our grouped weight pass inside."""
    ours_cfg = with_calibrator(INPUTS_ON[fmt], moeq_triton.CALIBRATOR) if loop else PAIRS[fmt][0]
    theirs_cfg = with_calibrator(ours_cfg, "max")
    ours, theirs = llama4_text(), llama4_text()
    reset_launch_counts()
    mtq.quantize(ours, ours_cfg, forward_loop=token_loop() if loop else None)
    assert LAST_PATH.path == ("modelopt" if loop else "whole-model"), LAST_PATH
    assert launch_counts() == ({"row_amax": 1} if fmt == "fp8-per-channel" else {"amax": 1})
    mtq.quantize(theirs, theirs_cfg, forward_loop=token_loop() if loop else None)
    experts = ours.model.layers[1].feed_forward.experts
    for projection in ("gate_up_proj", "down_proj"):
        amax = getattr(experts, f"{projection}_weight_quantizer").amax
        shape = (4, 1, 1) if fmt == "fp8-per-channel" else ()
        assert amax.shape == shape and amax.dtype == torch.bfloat16, (projection, amax.shape, amax.dtype)
    assert_same_amaxes(ours, theirs)
    assert_same_quantizer_attributes(ours, theirs)
    assert_same_modelopt_state(ours, theirs, moeq_triton.CALIBRATOR)
    assert_same_export(ours, theirs, tmp_path)


def test_reduction_view_is_a_copy_free_view_of_the_same_elements():
    """The tensor reduced for a quantizer's amax: the same storage (no copy), and the amax ModelOpt's
    reduce over the fed view gives.  Non-square dims, so a transposition mistake changes a shape."""
    gen = torch.Generator().manual_seed(7)
    stacked = torch.randn(3, 5, 7, generator=gen, dtype=torch.float32)  # [E, in, out] as Llama-4 holds it
    fed = stacked.transpose(-1, -2)  # what ModelOpt yields: [E, out, in], strides (35, 1, 7)
    per_tensor = reduction_view(None, fed)
    assert per_tensor.is_contiguous() and per_tensor.data_ptr() == stacked.data_ptr()
    assert_bitwise_equal(per_tensor.abs().amax(), fed.abs().amax(), "per tensor")
    for axis in (0, (0,), [0], -3):  # every spelling of "keep dim 0" in ModelOpt's axis convention
        rows = reduction_view(axis, fed)
        assert rows.shape == (3, 35) and rows.data_ptr() == stacked.data_ptr(), axis
        assert_bitwise_equal(rows.abs().amax(-1), fed.abs().amax(dim=(1, 2)), f"per expert, axis {axis}")
    assert reduction_view(-2, fed) is None  # keeps dim 1 of a 3-D weight: not rows of dim 0
    assert reduction_view((0, 1), fed) is None
    weight = stacked[0]
    assert reduction_view(0, weight) is weight and reduction_view(-2, weight) is weight  # 2-D: rows as they are
    assert reduction_view(None, weight[::2]) is not None  # row stride free, last-dim stride 1: as it is
    assert reduction_view(None, weight[:, ::2]) is None  # last-dim stride 2, not dense
    assert reduction_view(0, weight.t()) is None  # channels along the stride-1 dim: no row layout
    assert reduction_view(None, fed[:, ::2]) is None  # not dense: ModelOpt's forward collects it
    assert reduction_view(None, stacked[:1, :1].expand(3, 5, 7).transpose(-1, -2)) is None  # overlapping


def test_weight_without_a_copy_free_view_goes_through_modelopt_forward(monkeypatch):
    """A fed view that no permutation makes contiguous (every other column of Llama-4's transposed
    experts) is collected by ModelOpt's own forward: the whole model falls back, same amaxes as max."""
    from modelopt.torch.quantization.plugins.huggingface import _TransposedExpertsCalibMixin

    def every_other_column(self):
        for projection in ("gate_up_proj", "down_proj"):
            yield (
                getattr(self, projection).transpose(-1, -2)[:, :, ::2],
                getattr(self, f"{projection}_weight_quantizer"),
            )

    monkeypatch.setattr(_TransposedExpertsCalibMixin, "iter_weights_for_calibration", every_other_column)
    ours, theirs = llama4_text(), llama4_text()
    mtq.quantize(ours, moeq_triton.FP8_WEIGHT_ONLY_CFG)
    assert LAST_PATH.path == "modelopt" and "gate_up_proj_weight_quantizer" in LAST_PATH.reason, LAST_PATH
    mtq.quantize(theirs, with_calibrator(moeq_triton.FP8_WEIGHT_ONLY_CFG, "max"))
    experts = ours.model.layers[1].feed_forward.experts
    expected = experts.down_proj.transpose(-1, -2)[:, :, ::2].abs().amax()
    assert_bitwise_equal(experts.down_proj_weight_quantizer.amax, expected, "down_proj, every other column")
    assert_same_amaxes(ours, theirs)


@pytest.mark.slow  # disk offload and ModelOpt's per-module contexts: about 17 s on 2 cores
def test_accelerate_offload_falls_back_to_modelopts_weight_access_with_max_amaxes(tmp_path, monkeypatch):
    """A model dispatched by accelerate with its decoder layers offloaded to disk (parameters on meta,
    an AlignDevicesHook per module) is detected: ModelOpt's max_calibrate runs and opens its accelerate
    weight-access context per module, our grouped pass reads the weights inside it, and every amax
    equals max's on the same model never offloaded.  The weights are reduced inside each context: no
    materialized weight outlives its module's context (each is dead by the next context's end), so
    memory stays bounded by a module as with ModelOpt's own per-module reduction."""
    import gc
    import weakref

    from accelerate import dispatch_model
    from accelerate.hooks import AlignDevicesHook

    reference = tiny_qwen3_moe()
    mtq.quantize(reference, with_calibrator(moeq_triton.NVFP4_WEIGHT_ONLY_CFG, "max"))
    model = tiny_qwen3_moe()
    kept = ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")
    dispatch_model(model, {**dict.fromkeys(kept, "cpu"), "model.layers": "disk"}, "cpu", offload_dir=str(tmp_path))
    assert model.model.layers[1].mlp.experts.gate_up_proj.device.type == "meta"

    materialized: list[tuple[str, weakref.ref]] = []  # weights of contexts already closed
    alive_later: list[str] = []
    post_forward = AlignDevicesHook.post_forward

    def closing(self, module, output):
        gc.collect()
        alive_later.extend(name for name, ref in materialized if ref() is not None)
        materialized.extend(
            (f"{type(module).__name__}.{n}", weakref.ref(p)) for n, p in module.named_parameters(recurse=False)
        )
        return post_forward(self, module, output)

    monkeypatch.setattr(AlignDevicesHook, "post_forward", closing)
    reset_launch_counts()
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    assert LAST_PATH.path == "modelopt" and "accelerate offload" in LAST_PATH.reason, LAST_PATH
    assert len(materialized) > 8 and alive_later == [], alive_later[:6]
    assert launch_counts().get("amax", 0) > 1  # one grouped launch per offloaded module context
    assert_same_amaxes(model, reference)


def test_te_stand_in_leaves_what_modelopt_max_leaves():
    """TE GroupedLinear's contract (per-expert GroupedQuantizer): amaxes, attributes and state as max's."""
    ours, theirs = heavy_tailed_(GroupedMoEStandIn(layers=2, experts=4)), heavy_tailed_(GroupedMoEStandIn(2, 4))
    mtq.quantize(ours, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    assert LAST_PATH.path == "whole-model"
    mtq.quantize(theirs, mtq.W4A16_NVFP4_CFG)
    assert_same_amaxes(ours, theirs)
    assert_same_quantizer_attributes(ours, theirs)
    assert_same_modelopt_state(ours, theirs, moeq_triton.CALIBRATOR)


@per_expert_te_quantizers
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


@per_expert_te_quantizers
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


@pytest.mark.parametrize(("layers", "experts"), [(2, 4), (16, 4), pytest.param(2, 128, marks=pytest.mark.slow)])
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
    assert len(moeq_triton.calibration_stats()) == layers * 2 * (experts if PER_EXPERT_QUANTIZERS else 1)


@pytest.mark.parametrize("model", ["qwen3-moe", "per-expert"])
@pytest.mark.parametrize("loop", [False, True], ids=["weights-only", "forward-loop"])
def test_save_restore_round_trip(model, loop, tmp_path):
    """mto.save / mto.restore of a model quantized with triton_grouped: the same amaxes and state."""
    build = BUILDERS[model]
    cfg = with_calibrator(mtq.FP8_DEFAULT_CFG, moeq_triton.CALIBRATOR) if loop else moeq_triton.NVFP4_WEIGHT_ONLY_CFG
    quantized = mtq.quantize(build(), cfg, forward_loop=token_loop() if loop else None)
    assert "triton_grouped" in repr(mto.modelopt_state(quantized))
    assert_save_restore(quantized, build, tmp_path)


@pytest.mark.parametrize("name", ["triton_grupped", "triton-grouped", "Triton_Grouped", "maxx"])
def test_unknown_calibrator_name_is_rejected_with_the_valid_names(name):
    """Typos stay rejected, and the error names every valid value and the import that registers ours."""
    cfg = with_calibrator(moeq_triton.NVFP4_WEIGHT_ONLY_CFG, name)
    with pytest.raises(Exception) as error:
        mtq.quantize(tiny_qwen3_dense(), cfg)
    message = str(error.value)
    assert f"calibrator {name!r} is not a known calibrator name" in message, message
    for valid in ("'max'", "'histogram'", "'triton_grouped'", "'triton_grouped_shared'", "`import moeq_triton`"):
        assert valid in message, message


def test_calibrator_classes_and_valid_names_still_pass_the_validator():
    """The wrapped validator keeps ModelOpt's answers for what it accepted before."""
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    for value in ("max", "histogram", "triton_grouped", "triton_grouped_shared", HistogramCalibrator):
        assert QuantizerAttributeConfig(calibrator=value).calibrator == value


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


@per_expert_te_quantizers
def test_quantizer_without_weight_is_reported():
    """A module whose iter_weights_for_calibration() skips a weight: a warning names the quantizer."""
    model = GroupedMoEStandIn(layers=1, experts=3)
    del model.layers[0].mlp.experts.linear_fc2.weight2  # the stand-in then yields no weight for expert 2
    with pytest.warns(UserWarning, match=r"linear_fc2\.weight_quantizer\.2"):
        mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    rows = {r.quantizer: r for r in moeq_triton.calibration_stats()}
    assert rows["layers.0.mlp.experts.linear_fc2.weight_quantizer.2"].amax is None


def test_shared_scale_group_drops_only_the_expert_index():
    assert shared_scale_group("decoder.layers.3.mlp.experts.linear_fc1.weight_quantizer.7") == (
        "decoder.layers.3.mlp.experts.linear_fc1.weight_quantizer.*"
    )
    assert shared_scale_group("model.layers.3.mlp.experts.gate_up_proj_weight_quantizers.7") == (
        "model.layers.3.mlp.experts.gate_up_proj_weight_quantizers.*"
    )
    assert shared_scale_group("decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight_quantizer") == (
        "decoder.layers.3.mlp.experts.local_experts.*.linear_fc2.weight_quantizer"
    )
    assert shared_scale_group("model.layers.3.self_attn.q_proj.weight_quantizer") == (
        "model.layers.3.self_attn.q_proj.weight_quantizer"
    )


def test_failed_pass_leaves_nothing_pending(monkeypatch):
    """An error midway through ModelOpt's weight loop must not leak records into the next calibration."""
    from tests.grouped_linear_standin import QuantGroupedLinearStandIn

    original = QuantGroupedLinearStandIn.iter_weights_for_calibration

    def fails_after_one(self):
        yield next(iter(original(self)))
        raise RuntimeError("injected failure")

    monkeypatch.setattr(QuantGroupedLinearStandIn, "iter_weights_for_calibration", fails_after_one)
    with pytest.raises(RuntimeError, match="injected failure"):
        mtq.quantize(GroupedMoEStandIn(layers=1, experts=2), moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    monkeypatch.undo()
    model = GroupedMoEStandIn(layers=1, experts=2)
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)  # a clean pass after the failed one
    assert len(moeq_triton.calibration_stats()) == (4 if PER_EXPERT_QUANTIZERS else 2)


@pytest.mark.slow  # a fresh Python process that imports ModelOpt
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


def _scale_group_amaxes(model) -> dict[str, set[float]]:
    """Distinct per-expert weight amaxes of each fused-experts scale group (gate_up_proj / down_proj per layer)."""
    groups: dict[str, set[float]] = {}
    for name, buffer in amax_buffers(model).items():
        if "_weight_quantizers." in name:
            groups.setdefault(shared_scale_group(name.removesuffix("._amax")), set()).add(buffer.float().item())
    return groups


def test_shared_scale_group_amax_survives_a_forward_loop():
    """Issue 13 item 4: in "triton_grouped_shared" mode a forward loop after the weight pass fed each
    expert's weight again, and a later flush replaced the scale group's shared amax by per-expert values
    (1 distinct amax per scale group without a loop, 4 with one).  Fused experts, FP8_DEFAULT_CFG (inputs on)."""
    cfg = with_calibrator(mtq.FP8_DEFAULT_CFG, moeq_triton.CALIBRATOR_SHARED)
    without_loop, with_loop = tiny_qwen3_moe(), tiny_qwen3_moe()
    mtq.quantize(without_loop, cfg)
    mtq.quantize(with_loop, cfg, forward_loop=token_loop())
    groups = _scale_group_amaxes(with_loop)
    assert len(groups) == 2 * 2, groups.keys()  # 2 layers x (gate_up_proj, down_proj)
    assert all(len(values) == 1 for values in groups.values()), groups
    assert groups == _scale_group_amaxes(without_loop)
    experts = with_loop.model.layers[1].mlp.experts
    assert groups[shared_scale_group("model.layers.1.mlp.experts.down_proj_weight_quantizers.0")] == {
        experts.down_proj.abs().amax().float().item()
    }


def test_calibrator_keeps_its_synced_mark_only_while_its_amax_is_unchanged():
    """A tensor fed after the grouped pass that does not raise the amax keeps the cross-rank result
    valid; one that raises it must go through ModelOpt's per-quantizer sync again."""
    calibrator = TritonGroupedCalibrator(shared=True)
    calibrator._calib_amax = torch.tensor(4.0, dtype=torch.bfloat16)
    calibrator.synced = True
    calibrator.collect(torch.tensor([[1.0, -3.0]], dtype=torch.bfloat16))
    assert calibrator.synced and calibrator._calib_amax.item() == 4.0
    calibrator.collect(torch.tensor([[-5.0, 1.0]], dtype=torch.bfloat16))
    assert not calibrator.synced and calibrator._calib_amax.item() == 5.0


def _shared_group(*amaxes: torch.Tensor | None):
    """A q/k/v-like group built the way ``attach`` builds it: members holding weight quantizers with
    the given ``_amax`` buffers (None: uncalibrated), one ModelOpt state over them."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.utils import SharedWeightGlobalAmaxState

    from moeq_triton.modelopt.shared_amax import SharedGroup

    members = []
    for amax in amaxes:
        member = torch.nn.Module()
        member.weight_quantizer = TensorQuantizer()
        if amax is not None:
            member.weight_quantizer.amax = amax
        members.append(member)
    state = SharedWeightGlobalAmaxState()
    state.set_members(torch.nn.Module(), members)
    return SharedGroup(state, [m.weight_quantizer for m in members])


@pytest.mark.parametrize(
    "amaxes",
    [
        (torch.tensor(0.5), torch.tensor([[0.25], [3.0]]), None),  # per tensor and per channel, one uncalibrated
        (torch.tensor(-2.0, dtype=torch.bfloat16), torch.tensor(1.5)),  # dtypes mixed; a negative amax
        (None, None),  # nothing calibrated: the state stays empty, as ModelOpt's finalize leaves it
    ],
    ids=["per-channel", "mixed-dtypes", "empty"],
)
@needs_shared_states
def test_populate_fills_the_group_as_modelopt_finalize_does(amaxes):
    from moeq_triton.modelopt.shared_amax import populate

    ours, theirs = _shared_group(*amaxes), _shared_group(*amaxes)
    assert populate([ours])
    theirs.state.finalize()
    if theirs.state.global_amax is None:
        assert ours.state.global_amax is None
    else:
        assert_bitwise_equal(ours.state.global_amax, theirs.state.global_amax)


@pytest.mark.parametrize(
    "amaxes",
    [(torch.tensor(1.0), torch.tensor(float("nan"))), (torch.tensor(1.0), torch.tensor(2.0, dtype=torch.float64))],
    ids=["nan", "float64"],
)
@needs_shared_states
def test_populate_leaves_the_cases_it_does_not_reproduce_untouched(amaxes):
    """NaN (torch.max propagates it, our scatter would not) and a dtype outside the float formats:
    nothing is written, so the caller's fallback, ModelOpt's own populate, decides."""
    from moeq_triton.modelopt.shared_amax import populate

    group = _shared_group(*amaxes)
    assert not populate([group])
    assert group.state.global_amax is None

"""triton_grouped_shared keeps one amax per scale group through a forward loop (issue 13, item 4).

The model is ModelOpt's own Qwen3-VL-MoE fused-experts fixture rebuilt from transformers' config
classes (tests/models.py).  Only public names of moeq_triton are used here, so the same file runs
against older trees (the report of issue 13 shows it failing before the fix).
"""

from __future__ import annotations

import copy
import warnings

import modelopt
import modelopt.torch.quantization as mtq
import pytest
import torch

import moeq_triton
from tests.assertions import assert_bitwise_equal
from tests.distributed_harness import run_ranks, values
from tests.models import qwen3_moe_experts, qwen3_vl_moe_experts

warnings.filterwarnings("ignore", message=".*transformers.*not tested.*")

GROUPS = ("experts.gate_up_proj_weight_quantizers", "experts.down_proj_weight_quantizers")


def shared_fp8_cfg() -> dict:
    """ModelOpt's FP8_DEFAULT_CFG (inputs on: the forward loop calibrates them) with every weight
    quantizer on "triton_grouped_shared"."""
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    for entry in cfg["quant_cfg"]:
        if "weight_quantizer" in entry.get("quantizer_name", "") and "cfg" in entry:
            entry["cfg"] = {**entry["cfg"], "calibrator": moeq_triton.CALIBRATOR_SHARED}
    return cfg


def group_amaxes(model) -> dict[str, list[torch.Tensor]]:
    """Every expert weight quantizer's _amax, by group (the ModuleList of one stacked projection)."""
    buffers = dict(model.named_buffers())
    return {f: [v for n, v in buffers.items() if n.startswith(f + ".") and n.endswith("._amax")] for f in GROUPS}


def expert_quantizers(model) -> list:
    return [q for f in GROUPS for q in model.get_submodule(f)]


def run_forward(model) -> None:
    model()


FIXTURES = {
    "qwen3-vl-moe": pytest.param(
        qwen3_vl_moe_experts,
        marks=pytest.mark.skipif(
            modelopt.__version__.startswith("0.45."),
            reason="ModelOpt 0.45's own conversion of transformers 5.24's Qwen3VLMoeTextExperts fails "
            "('QuantQwen3VLMoeTextExperts' object has no attribute 'hidden_size'); qwen3-moe runs instead",
        ),
    ),
    "qwen3-moe": qwen3_moe_experts,
}


@pytest.mark.parametrize("build", list(FIXTURES.values()), ids=list(FIXTURES))
@pytest.mark.parametrize("loop", [None, run_forward], ids=["weights-only", "forward-loop"])
def test_one_amax_per_scale_group_with_and_without_a_forward_loop(loop, build):
    """Before the fix, the forward loop fed each expert's slice again and a later flush replaced the
    group's shared amax by the per-expert values: 1 distinct amax per group without a loop, 4 with
    one.  Now: one value per group, max |W| of the whole stacked parameter, in both cases."""
    model = build()
    mtq.quantize(model, shared_fp8_cfg(), forward_loop=loop)
    experts = model.experts
    for group, amaxes in group_amaxes(model).items():
        assert len(amaxes) == 4, (group, len(amaxes))
        distinct = {a.item() for a in amaxes}
        assert len(distinct) == 1, f"{group}: {len(distinct)} distinct amaxes {sorted(distinct)} (seed 0)"
        stacked = getattr(experts, group.split(".")[1].removesuffix("_weight_quantizers"))
        for i, amax in enumerate(amaxes):
            assert_bitwise_equal(amax, stacked.abs().amax(), f"{group}.{i}")
    if loop is not None:  # the loop did reach the experts: their input quantizers were calibrated
        assert experts.gate_up_proj_input_quantizer.amax is not None


def _two_ranks(rank: int, world: int) -> dict:
    """Rank r holds the fixture's weights times 2**r (exact in float32), as ranks that hold different
    weights for one quantizer would; FP8 shared mode with a forward loop."""
    from tests.models import qwen3_moe_experts, qwen3_vl_moe_experts

    model = (qwen3_moe_experts if modelopt.__version__.startswith("0.45.") else qwen3_vl_moe_experts)()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(2.0**rank)
    mtq.quantize(model, shared_fp8_cfg(), forward_loop=run_forward)
    return {
        "amaxes": {f: [a.item() for a in amaxes] for f, amaxes in group_amaxes(model).items()},
        "synced": [q._calibrator.synced for q in expert_quantizers(model)],
        "stacked": {
            f: getattr(model.experts, f.split(".")[1].removesuffix("_weight_quantizers")).abs().amax().item()
            for f in GROUPS
        },  # fmt: skip
    }


@pytest.mark.slow  # two spawned gloo ranks that import ModelOpt (about 30 s on 2 cores)
def test_scale_group_amax_stays_the_cross_rank_value_after_a_forward_loop():
    """Two gloo ranks: the grouped weight pass reduces each group's amax across ranks (one collective)
    and marks it synced.  The forward loop feeds every expert's local slice again; each is below the
    reduced value, so the amax and the mark stay: both ranks end with rank 1's group max.  (Before
    the fix the loop's flush put back rank 0's local per-expert values and dropped the marks; ModelOpt
    0.47's own per-quantizer sync never reaches these quantizers, which sit in a ModuleList, so the
    ranks then disagreed.)  A value that does change drops the mark: see test_modelopt_backend."""
    ranks = values(run_ranks(_two_ranks, 2, timeout_s=300))
    for rank, result in enumerate(ranks):
        for group in GROUPS:
            expected = ranks[1]["stacked"][group]
            assert result["amaxes"][group] == [expected] * 4, (rank, group, result["amaxes"][group], expected)
        assert result["synced"] == [True] * 8, (rank, result["synced"])
    assert ranks[0]["stacked"][GROUPS[0]] < ranks[1]["stacked"][GROUPS[0]]  # the reduction mattered

"""What the two scale modes equal on the installed ModelOpt release (issue 26 item 3).

CI runs this file against every supported release (``make test-modelopt-versions``), so the README's
sentence about the modes is checked per release: ModelOpt's ``max`` keeps one amax per expert for
transformers' fused experts and for one module per expert on 0.45, 0.46 and 0.47 alike, and
``triton_grouped`` equals it bit for bit; ``triton_grouped_shared`` gives every expert of one linear the
max over that linear's experts, which no release's ``max`` does for these layouts (for Transformer
Engine's GroupedLinear, 0.45 and 0.46 keep one quantizer per linear: see test_modelopt_backend).
"""

from __future__ import annotations

import re
import warnings

import modelopt.torch.quantization as mtq
import pytest
import torch

import moeq_triton
from tests.assertions import assert_bitwise_equal
from tests.calibration_models import amax_buffers, per_expert_qwen3_moe, tiny_qwen3_moe, with_calibrator

warnings.filterwarnings("ignore", message=".*transformers.*not tested.*")

BUILDERS = {"fused-experts": tiny_qwen3_moe, "per-expert": per_expert_qwen3_moe}


def routed_expert_groups(amaxes: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The routed experts' weight amaxes by linear: the expert index written as '*' (written here, not
    taken from the code under test)."""
    groups: dict[str, list[str]] = {}
    for name in amaxes:
        if "weight_quantizer" in name and ".experts." in name:
            key = re.sub(r"experts\.\d+\.", "experts.*.", re.sub(r"quantizers\.\d+\._amax$", "quantizers.*", name))
            groups.setdefault(key, []).append(name)
    return groups


@pytest.mark.parametrize("layout", list(BUILDERS))
def test_max_keeps_one_amax_per_expert_and_shared_mode_takes_the_linears_max(layout):
    ours_cfg = moeq_triton.NVFP4_WEIGHT_ONLY_CFG
    models = {mode: BUILDERS[layout]() for mode in ("max", "triton_grouped", "triton_grouped_shared")}
    for mode, model in models.items():
        mtq.quantize(model, with_calibrator(ours_cfg, mode))
    theirs = amax_buffers(models["max"])
    ours, shared = amax_buffers(models["triton_grouped"]), amax_buffers(models["triton_grouped_shared"])
    groups = routed_expert_groups(theirs)
    assert len(groups) >= 4 and all(len(members) == 4 for members in groups.values()), sorted(groups)
    for group, members in groups.items():
        per_expert = [theirs[n] for n in members]
        assert len({a.item() for a in per_expert}) > 1, f"{group}: max gave one amax for every expert"
        top = torch.stack(per_expert).amax()
        for name in members:
            assert_bitwise_equal(ours[name], theirs[name], name)  # triton_grouped == max, per expert
            assert_bitwise_equal(shared[name], top, name)  # shared: the linear's max over its experts
    grouped = {n for members in groups.values() for n in members}
    for name in theirs.keys() - grouped:  # every other quantizer: per module, as max (shared states follow
        if "_shared_quant_states" not in name:  # their members, which differ in the shared mode)
            assert_bitwise_equal(shared[name], theirs[name], name)

"""triton_grouped on a real megatron-core GPTModel (local spec, SequentialMLP experts) on CPU."""

from __future__ import annotations

import modelopt.torch.quantization as mtq
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

import moeq_triton
from moeq_triton.kernels import launch_counts, reset_launch_counts
from moeq_triton.modelopt.weight_calibration import LAST_PATH
from tests.assertions import assert_bitwise_equal
from tests.calibration_models import assert_same_modelopt_state, assert_same_quantizer_attributes, with_calibrator


def tiny_gpt_moe(experts: int = 4, seed: int = 0) -> GPTModel:
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=128, moe_ffn_hidden_size=32, num_moe_experts=experts, moe_router_topk=2,
        gated_linear_unit=True, normalization="RMSNorm", qk_layernorm=True, add_bias_linear=False,
        use_cpu_initialization=True, params_dtype=torch.bfloat16, bf16=True,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(
        num_experts=experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )
    model = GPTModel(config, spec, vocab_size=128, max_sequence_length=32).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) ** 3).to(p.dtype))
    return model


def test_sequential_mlp_parity_with_modelopt_max(megatron_world):
    """Every expert's linear_fc1/fc2 quantizer gets max|W_e|, bitwise as ModelOpt's max calibrator, through
    the whole-model path (torch.distributed initialized, world of one); every quantizer attribute and
    mto.modelopt_state are max's too."""
    ours, theirs = tiny_gpt_moe(), tiny_gpt_moe()
    reset_launch_counts()
    mtq.quantize(ours, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    assert LAST_PATH.path == "whole-model", LAST_PATH
    assert launch_counts() == {"amax": 1}
    mtq.quantize(theirs, with_calibrator(moeq_triton.NVFP4_WEIGHT_ONLY_CFG, "max"))
    assert_same_quantizer_attributes(ours, theirs)
    assert_same_modelopt_state(ours, theirs, moeq_triton.CALIBRATOR)
    a = {n: b for n, b in ours.named_buffers() if n.endswith("_amax")}
    b = {n: b for n, b in theirs.named_buffers() if n.endswith("_amax")}
    assert a.keys() == b.keys()
    experts = [n for n in a if "local_experts" in n and "weight_quantizer" in n]
    assert len(experts) == 2 * 2 * 4, experts
    for name in a:
        assert_bitwise_equal(a[name], b[name], name)
    fc1 = ours.decoder.layers[1].mlp.experts.local_experts[3].linear_fc1
    assert_bitwise_equal(fc1.weight_quantizer.amax, fc1.weight.abs().amax(), "expert 3 fc1")

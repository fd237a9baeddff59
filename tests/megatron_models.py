"""The tiny megatron-core GPTModel (Qwen3-MoE layout) of the Megatron tests and the transformers config it mirrors."""

from __future__ import annotations

import re
import zlib

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from transformers import Qwen3MoeConfig

EXPERTS, LAYERS, HIDDEN, MOE_FFN = 4, 2, 64, 32


def hf_config() -> Qwen3MoeConfig:
    """The transformers config the tiny GPTModel mirrors (same sizes, RMSNorm eps, rope theta, untied head)."""
    return Qwen3MoeConfig(
        hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=MOE_FFN, num_experts=EXPERTS,
        num_experts_per_tok=2, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, rms_norm_eps=1e-5, rope_theta=10000.0, norm_topk_prob=True,
        tie_word_embeddings=False, max_position_embeddings=32,
    )  # fmt: skip


def gpt_moe(dtype: torch.dtype = torch.bfloat16, ep_rank: int = 0, ep_size: int = 1) -> GPTModel:
    """Weights are a function of the parameter's *global* name, so an EP rank holds slices of one model."""
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=128, moe_ffn_hidden_size=MOE_FFN, num_moe_experts=EXPERTS, moe_router_topk=2,
        gated_linear_unit=True, normalization="RMSNorm", qk_layernorm=True, add_bias_linear=False,
        use_cpu_initialization=True, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        expert_model_parallel_size=ep_size, layernorm_epsilon=1e-5, activation_func=torch.nn.functional.silu,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(
        num_experts=EXPERTS, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )
    model = GPTModel(
        config, spec, vocab_size=128, max_sequence_length=32, share_embeddings_and_output_weights=False,
        position_embedding_type="rope", rotary_base=10000,
    ).to(dtype)  # fmt: skip
    local = EXPERTS // ep_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            glob = re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{ep_rank * local + int(m[1])}.", name)
            gen = torch.Generator().manual_seed(zlib.crc32(glob.encode()))
            scale = 0.2 if "layernorm" not in name else 1.0
            p.copy_((1.0 if "layernorm" in name else 0.0) + scale * torch.randn(p.shape, generator=gen))
    return model

"""Megatron-Core parameter names -> Hugging Face names (Qwen3-MoE layout), as data.

The exporter applies these one-to-one renames first; fused tensors (linear_qkv, an expert's linear_fc1)
are split by ``exporter.megatron_tensors`` itself because splitting needs shapes, not just names.
"""

from __future__ import annotations

import re

RENAMES = (
    (r"embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (r"decoder\.final_layernorm\.weight", "model.norm.weight"),
    (r"output_layer\.weight", "lm_head.weight"),
    (r"decoder\.layers\.(\d+)\.input_layernorm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (
        r"decoder\.layers\.(\d+)\.self_attention\.linear_qkv\.layer_norm_weight",
        r"model.layers.\1.input_layernorm.weight",
    ),
    (r"decoder\.layers\.(\d+)\.self_attention\.q_layernorm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"decoder\.layers\.(\d+)\.self_attention\.k_layernorm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"decoder\.layers\.(\d+)\.self_attention\.linear_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"decoder\.layers\.(\d+)\.pre_mlp_layernorm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"decoder\.layers\.(\d+)\.mlp\.router\.weight", r"model.layers.\1.mlp.gate.weight"),
)
"""(Megatron name pattern, HF name) pairs; full matches only."""

_COMPILED = tuple((re.compile(pattern), replacement) for pattern, replacement in RENAMES)


def hf_name(megatron_name: str) -> str | None:
    """The HF name of a one-to-one Megatron parameter, or None (fused, or unknown)."""
    for pattern, replacement in _COMPILED:
        if pattern.fullmatch(megatron_name):
            return pattern.sub(replacement, megatron_name)
    return None

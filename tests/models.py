"""Tiny transformers models and ModelOpt configs shared by several test files (builders, not tests).

Weights come from ``moeq_triton.synthetic.heavy_tailed`` with a seed the caller passes (default 0), so a
failing test can be rebuilt exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moeq_triton.synthetic import heavy_tailed


def heavy_tailed_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter (in order) filled with cubed normals from ``seed``, in its own dtype."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(heavy_tailed(p.shape, gen, p.dtype))
    return model


def qwen3_moe_config(layers: int = 2, experts: int = 4):
    """The tiny Qwen3-MoE config of the tests: hidden 64, experts of 32."""
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=experts,
        num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, vocab_size=128,
    )  # fmt: skip
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    return cfg


def tiny_qwen3_moe(layers: int = 2, experts: int = 4, seed: int = 0) -> nn.Module:
    """A Qwen3-MoE of ``qwen3_moe_config``, bf16, heavy-tailed weights from ``seed``."""
    from transformers import Qwen3MoeForCausalLM

    return heavy_tailed_(Qwen3MoeForCausalLM(qwen3_moe_config(layers, experts)).to(torch.bfloat16), seed)


def without_inputs(cfg: dict) -> dict:
    """ModelOpt's own config with input quantizers disabled: the weight-only reference."""
    cfg = copy.deepcopy(cfg)
    cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer", "enable": False})
    return cfg

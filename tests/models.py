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


class FusedExpertsAlone(nn.Module):
    """A model that is one fused-experts module called on fixed routing (ModelOpt's own Qwen3-VL-MoE
    fixture in tests/unit/torch/quantization/plugins/test_fused_experts.py is this shape: the experts
    module alone, every expert routed, ``forward()`` without arguments)."""

    def __init__(
        self, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ):
        super().__init__()
        self.experts = experts
        self.routing = (hidden, top_k_index, top_k_weights)

    def forward(self) -> torch.Tensor:
        return self.experts(*self.routing)


def qwen3_vl_moe_experts(seed: int = 0, experts: int = 4, top_k: int = 2) -> FusedExpertsAlone:
    """transformers' ``Qwen3VLMoeTextExperts`` at ModelOpt's fixture sizes (hidden 32, experts of 12,
    4 experts, top-2, eager experts), float32 N(0, 0.02) weights from ``seed``; the routing sends
    token t to experts 2t and 2t + 1, so every expert is hit."""
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    return _fused_experts_alone(Qwen3VLMoeTextConfig, Qwen3VLMoeTextExperts, seed, experts, top_k)


def qwen3_moe_experts(seed: int = 0, experts: int = 4, top_k: int = 2) -> FusedExpertsAlone:
    """The same fixture with transformers' ``Qwen3MoeExperts`` (what ModelOpt 0.45 can convert too: its
    Qwen3-VL-MoE plugin fails on transformers 5.24's experts module)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    return _fused_experts_alone(Qwen3MoeConfig, Qwen3MoeExperts, seed, experts, top_k)


def _fused_experts_alone(config_class, experts_class, seed: int, experts: int, top_k: int) -> FusedExpertsAlone:
    cfg = config_class(
        hidden_size=32, intermediate_size=32, moe_intermediate_size=12, num_experts=experts,
        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    cfg._experts_implementation = "eager"  # the implementation that calls F.linear on each expert's slice
    module = experts_class(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():  # created with torch.empty
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    tokens = experts // top_k
    hidden = torch.randn(tokens, 32, generator=gen)
    index = torch.arange(experts).reshape(tokens, top_k)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=-1)
    return FusedExpertsAlone(module, hidden, index, weights)

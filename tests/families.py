"""Tiny models of each supported MoE family, built from transformers config classes (no downloads).

Shared by tests/test_families.py: 2-3 layers, 4 experts, a dense first layer / MTP layer / linear
attention / vision tower where the family has one, heavy-tailed bf16 weights from a recorded seed.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 1234  # every builder seeds from this plus its own offset; printed by the tests on failure

_COMMON = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=128, num_hidden_layers=3)


def student_t_(model: nn.Module, seed: int) -> nn.Module:
    """Student-t matrices (outliers make amax and block scales differ between tensors), positive vectors."""
    torch.manual_seed(seed)
    t = torch.distributions.StudentT(3.0)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.copy_(t.sample(param.shape) * 0.02 if param.dim() > 1 else torch.rand(param.shape) + 0.5)
    return model


def _built(model_class, cfg, seed: int) -> nn.Module:
    """``model_class(cfg)`` in bf16, its architecture recorded in the config, weights from ``seed``."""
    cfg.architectures = [model_class.__name__]
    return student_t_(model_class(cfg).to(torch.bfloat16), seed)


_HYBRID = dict(
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
)  # fmt: skip
"""Qwen3-Next / Qwen3.5 text layers: three linear-attention layers, then a full one."""

_LLAMA4_TEXT = dict(
    head_dim=32, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
    interleave_moe_layer_step=2, attention_chunk_size=64,
)  # fmt: skip


def deepseek_v3(seed: int = SEED, hidden_size: int = 64) -> nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        **{**_COMMON, "num_key_value_heads": 2, "hidden_size": hidden_size}, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
    )  # fmt: skip
    return _built(DeepseekV3ForCausalLM, cfg, seed)


def glm4_moe(seed: int = SEED + 1) -> nn.Module:
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    cfg = Glm4MoeConfig(
        **_COMMON, head_dim=32, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, attention_bias=True,
    )  # fmt: skip
    return _built(Glm4MoeForCausalLM, cfg, seed)


def qwen2_moe(seed: int = SEED + 2) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        **_COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return _built(Qwen2MoeForCausalLM, cfg, seed)


def qwen3_next(seed: int = SEED + 3) -> nn.Module:
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(
        **{**_COMMON, "num_hidden_layers": 4}, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, **_HYBRID,
    )  # fmt: skip
    return _built(Qwen3NextForCausalLM, cfg, seed)


def mixtral(seed: int = SEED + 4) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**_COMMON, head_dim=32, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    return _built(MixtralForCausalLM, cfg, seed)


def minimax_m2(seed: int = SEED + 5) -> nn.Module:
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    cfg = MiniMaxM2Config(**_COMMON, head_dim=32, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    return _built(MiniMaxM2ForCausalLM, cfg, seed)


def llama4(seed: int = SEED + 6) -> nn.Module:
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = dict(**_COMMON, **_LLAMA4_TEXT)
    vision = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
        patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
    )  # fmt: skip
    cfg = Llama4Config(text_config=text, vision_config=vision)
    return _built(Llama4ForConditionalGeneration, cfg, seed)


def llama4_text(seed: int = SEED + 7) -> nn.Module:
    """The text model alone (Llama4ForCausalLM, ``model.`` prefix): what ModelOpt can export on CPU."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(**_COMMON, **_LLAMA4_TEXT)
    return _built(Llama4ForCausalLM, cfg, seed)


def qwen3_5_moe(seed: int = SEED + 8) -> nn.Module:
    """Qwen3.5-MoE with its vision tower (``model.language_model.`` prefix, ``model.visual.*``)."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    text = dict(
        **{**_COMMON, "num_hidden_layers": 4}, head_dim=32, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, **_HYBRID,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    cfg = Qwen3_5MoeConfig(text_config=text, vision_config={**vision, "num_position_embeddings": 16})
    return _built(Qwen3_5MoeForConditionalGeneration, cfg, seed)


def qwen3_dense(seed: int = SEED + 9) -> nn.Module:
    """Qwen3 dense (the Qwen3-8B layout): attention with q/k norms, one gated MLP per layer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _built(Qwen3ForCausalLM, Qwen3Config(**_COMMON, head_dim=32, intermediate_size=96), seed)


def llama_dense(seed: int = SEED + 10) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return _built(LlamaForCausalLM, LlamaConfig(**_COMMON, intermediate_size=96), seed)


MULTIMODAL = ("llama4", "qwen3_5_moe")
"""Loaded back with AutoModelForImageTextToText."""

BUILDERS = {
    "deepseek_v3": deepseek_v3,
    "glm4_moe": glm4_moe,
    "qwen2_moe": qwen2_moe,
    "qwen3_next": qwen3_next,
    "mixtral": mixtral,
    "minimax_m2": minimax_m2,
    "llama4": llama4,
    "llama4_text": llama4_text,
    "qwen3_5_moe": qwen3_5_moe,
    "qwen3_dense": qwen3_dense,
    "llama_dense": llama_dense,
}


def save(model: nn.Module, path, shard: str = "60KB"):
    """save_pretrained into several shards; returns the directory."""
    model.save_pretrained(path, max_shard_size=shard)
    assert len(list(path.glob("*.safetensors"))) > 2, "expected a multi-shard checkpoint"
    return path


def fp32_kept(model: nn.Module) -> tuple[str, ...]:
    """Modules transformers keeps in float32 whatever the load dtype (DeepSeek/GLM routers): ModelOpt's
    export writes them as float32, the command passes the source dtype through."""
    return tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())

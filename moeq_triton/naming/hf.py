"""Hugging Face checkpoint naming of each supported MoE family, one data rule set per family.

What is quantized and kept reproduces ModelOpt 0.47's ``export_hf_checkpoint`` of the transformers model
with W4A16_NVFP4_CFG / FP8_DEFAULT_CFG (tests/test_families.py checks it family by family).
"""

from __future__ import annotations

from dataclasses import replace

from .rules import SHARED_INPUT, Family

ATTENTION = r"{L}\.self_attn\.[qkvo]_proj"
LM_HEAD = r"(?:language_model\.)?lm_head"
EMBED = r"{P}embed_tokens"
ROUTED = r"{L}\.mlp\.experts\.{E}\.(?:gate|up|down)_proj"
DENSE_MLP = r"{L}\.mlp\.(?:gate|up|down)_proj"
ROUTER = r"{L}\.mlp\.gate"

QWEN3_MOE = Family(
    name="Qwen3-MoE",
    architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    routed=(ROUTED,),
    quantized=(ATTENTION, DENSE_MLP),
    kept=(LM_HEAD, EMBED, ROUTER),
    notes="router (`mlp.gate`), embeddings, lm_head",
)

DEEPSEEK_V3 = Family(
    name="DeepSeek-V3 / R1 / V3.1, Kimi-K2",
    architectures=("DeepseekV3ForCausalLM",),
    model_types=("deepseek_v3", "kimi_k2"),
    routed=(ROUTED,),
    quantized=(
        r"{L}\.self_attn\.(?:q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)",
        r"{L}\.mlp\.(?:shared_experts\.)?(?:gate|up|down)_proj",
    ),
    kept=(LM_HEAD, EMBED, ROUTER),
    shared_input=(("q_a_proj", "kv_a_proj_with_mqa"), ("q_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")),
    notes="router + `e_score_correction_bias`, embeddings, lm_head, MTP layers (>= num_hidden_layers); "
    "MLA projections quantized (q_a/kv_a share weight_scale_2) unless `--exclude`d",
)

GLM4_MOE = Family(
    name="GLM-4.5 / 4.6 / 4.7",
    architectures=("Glm4MoeForCausalLM",),
    model_types=("glm4_moe",),
    routed=(ROUTED,),
    quantized=(ATTENTION, r"{L}\.mlp\.(?:shared_experts\.)?(?:gate|up|down)_proj"),
    kept=(LM_HEAD, EMBED, ROUTER),
    notes="router + `e_score_correction_bias`, embeddings, lm_head, MTP layers (>= num_hidden_layers)",
)

QWEN2_MOE = Family(
    name="Qwen2-MoE",
    architectures=("Qwen2MoeForCausalLM",),
    model_types=("qwen2_moe",),
    routed=(ROUTED,),
    quantized=(ATTENTION, DENSE_MLP, r"{L}\.mlp\.shared_expert\.(?:gate|up|down)_proj"),
    kept=(LM_HEAD, EMBED, ROUTER, r"{L}\.mlp\.shared_expert_gate"),
    notes="router, `shared_expert_gate`, embeddings, lm_head",
)

QWEN3_NEXT = Family(
    name="Qwen3-Next",
    architectures=("Qwen3NextForCausalLM",),
    model_types=("qwen3_next",),
    routed=(ROUTED,),
    quantized=(
        ATTENTION,
        DENSE_MLP,
        r"{L}\.mlp\.shared_expert\.(?:gate|up|down)_proj",
        r"{L}\.linear_attn\.(?:in_proj_qkvz|out_proj)",
    ),
    kept=(LM_HEAD, EMBED, ROUTER, r"{L}\.mlp\.shared_expert_gate", r"{L}\.linear_attn\.(?:conv1d|in_proj_ba)"),
    kept_prefixes=("mtp",),
    notes="router, `shared_expert_gate`, linear attention `conv1d` / `in_proj_ba` (+ A_log, dt_bias, norms), "
    "`mtp.*`, embeddings, lm_head",
)

QWEN3_5_MOE = Family(
    name="Qwen3.5-MoE / Qwen3.6",
    architectures=("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"),
    model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
    routed=(ROUTED,),
    quantized=(
        ATTENTION,
        DENSE_MLP,
        r"{L}\.mlp\.shared_expert\.(?:gate|up|down)_proj",
        r"{L}\.linear_attn\.(?:in_proj_qkv|in_proj_z|out_proj)",
    ),
    kept=(
        LM_HEAD,
        EMBED,
        ROUTER,
        r"{L}\.mlp\.shared_expert_gate",
        r"{L}\.linear_attn\.(?:conv1d|in_proj_a|in_proj_b)",
    ),
    split=(r"{L}\.mlp\.experts\.(?:gate_up_proj|down_proj)",),  # as released; transformers saves per expert
    shared_input=(*SHARED_INPUT, ("in_proj_qkv", "in_proj_z")),  # in_proj_a/b share the input too, but are kept
    kept_prefixes=("model.visual", "mtp"),
    notes="router, `shared_expert_gate`, linear attention `conv1d` / `in_proj_a` / `in_proj_b`, `model.visual*`, "
    "`mtp*`, embeddings, lm_head",
)

MIXTRAL = Family(
    name="Mixtral",
    architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    routed=(r"{L}\.block_sparse_moe\.experts\.{E}\.w[123]",),
    quantized=(ATTENTION,),
    kept=(LM_HEAD, EMBED, r"{L}\.block_sparse_moe\.gate"),
    notes="router (`block_sparse_moe.gate`), embeddings, lm_head",
)

MINIMAX_M2 = replace(  # Mixtral's tensor names and rules
    MIXTRAL,
    name="MiniMax-M2",
    architectures=("MiniMaxM2ForCausalLM",),
    model_types=("minimax_m2",),
    notes="router + `e_score_correction_bias`, embeddings, lm_head",
)

LLAMA4 = Family(
    name="Llama-4 Scout / Maverick",
    architectures=("Llama4ForConditionalGeneration", "Llama4ForCausalLM"),
    model_types=("llama4", "llama4_text"),
    routed=(),
    stacked=(r"{L}\.feed_forward\.experts\.(?:gate_up_proj|down_proj)",),
    quantized=(ATTENTION, r"{L}\.feed_forward\.(?:shared_expert\.)?(?:gate|up|down)_proj"),
    kept=(LM_HEAD, EMBED, r"{L}\.feed_forward\.router"),
    kept_prefixes=("vision_model", "multi_modal_projector"),
    notes="router, embeddings, lm_head, `vision_model*`, `multi_modal_projector*`; experts stay stacked "
    "(one weight_scale_2 per layer and projection, as ModelOpt writes them)",
)

FAMILIES = (QWEN3_MOE, DEEPSEEK_V3, GLM4_MOE, QWEN2_MOE, QWEN3_NEXT, QWEN3_5_MOE, MIXTRAL, MINIMAX_M2, LLAMA4)

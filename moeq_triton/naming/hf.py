"""Hugging Face checkpoint naming of each supported family (MoE; dense Qwen3 / Llama), one rule set per family.

What is quantized and kept reproduces ModelOpt 0.47's ``export_hf_checkpoint`` of the transformers model
with W4A16_NVFP4_CFG / FP8_DEFAULT_CFG (tests/test_families.py checks it family by family).
"""

from __future__ import annotations

from dataclasses import replace

from moeq_triton.naming.rules import SHARED_INPUT, Family

ATTENTION = r"{L}\.self_attn\.[qkvo]_proj"
LM_HEAD = r"(?:language_model\.)?lm_head"
EMBED = r"{P}embed_tokens"
ROUTED = r"{L}\.mlp\.experts\.{E}\.(?:gate|up|down)_proj"
DENSE_MLP = r"{L}\.mlp\.(?:gate|up|down)_proj"
ROUTER = r"{L}\.mlp\.gate"
SHARED_EXPERT = r"{L}\.mlp\.shared_expert\.(?:gate|up|down)_proj"  # Qwen's one shared expert
SHARED_EXPERT_GATE = r"{L}\.mlp\.shared_expert_gate"
DENSE_OR_SHARED_EXPERTS = r"{L}\.mlp\.(?:shared_experts\.)?(?:gate|up|down)_proj"  # DeepSeek's naming


def family(
    name: str,
    architectures: tuple[str, ...],
    model_types: tuple[str, ...],
    *,
    quantized: tuple[str, ...],
    kept: tuple[str, ...] = (),
    router: str = ROUTER,
    routed: tuple[str, ...] = (ROUTED,),
    **rest,
) -> Family:
    """A family with what every MoE family here shares: routed experts quantized, lm_head, the embeddings
    and the router kept (``kept`` adds to those)."""
    return Family(
        name=name, architectures=architectures, model_types=model_types, routed=routed, quantized=quantized,
        kept=(LM_HEAD, EMBED, router, *kept), **rest,
    )  # fmt: skip


QWEN3_MOE = family(
    "Qwen3-MoE", ("Qwen3MoeForCausalLM",), ("qwen3_moe",),
    quantized=(ATTENTION, DENSE_MLP),
    notes="router (`mlp.gate`), embeddings, lm_head",
)  # fmt: skip

DEEPSEEK_V3 = family(
    "DeepSeek-V3 / R1 / V3.1, Kimi-K2", ("DeepseekV3ForCausalLM",), ("deepseek_v3", "kimi_k2"),
    quantized=(
        r"{L}\.self_attn\.(?:q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)",
        DENSE_OR_SHARED_EXPERTS,
    ),
    shared_input=(("q_a_proj", "kv_a_proj_with_mqa"), ("q_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")),
    notes="router + `e_score_correction_bias`, embeddings, lm_head, MTP layers (>= num_hidden_layers); "
    "MLA projections quantized (q_a/kv_a share weight_scale_2) unless `--exclude`d",
)  # fmt: skip

GLM4_MOE = family(
    "GLM-4.5 / 4.6 / 4.7", ("Glm4MoeForCausalLM",), ("glm4_moe",),
    quantized=(ATTENTION, DENSE_OR_SHARED_EXPERTS),
    notes="router + `e_score_correction_bias`, embeddings, lm_head, MTP layers (>= num_hidden_layers)",
)  # fmt: skip

QWEN2_MOE = family(
    "Qwen2-MoE", ("Qwen2MoeForCausalLM",), ("qwen2_moe",),
    quantized=(ATTENTION, DENSE_MLP, SHARED_EXPERT),
    kept=(SHARED_EXPERT_GATE,),
    notes="router, `shared_expert_gate`, embeddings, lm_head",
)  # fmt: skip

QWEN3_NEXT = family(
    "Qwen3-Next", ("Qwen3NextForCausalLM",), ("qwen3_next",),
    quantized=(ATTENTION, DENSE_MLP, SHARED_EXPERT, r"{L}\.linear_attn\.(?:in_proj_qkvz|out_proj)"),
    kept=(SHARED_EXPERT_GATE, r"{L}\.linear_attn\.(?:conv1d|in_proj_ba)"),
    kept_prefixes=("mtp",),
    notes="router, `shared_expert_gate`, linear attention `conv1d` / `in_proj_ba` (+ A_log, dt_bias, norms), "
    "`mtp.*`, embeddings, lm_head",
)  # fmt: skip

QWEN3_5_MOE = family(
    "Qwen3.5-MoE / Qwen3.6", ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"),
    ("qwen3_5_moe", "qwen3_5_moe_text"),
    quantized=(ATTENTION, DENSE_MLP, SHARED_EXPERT, r"{L}\.linear_attn\.(?:in_proj_qkv|in_proj_z|out_proj)"),
    kept=(SHARED_EXPERT_GATE, r"{L}\.linear_attn\.(?:conv1d|in_proj_a|in_proj_b)"),
    split=(r"{L}\.mlp\.experts\.(?:gate_up_proj|down_proj)",),  # as released; transformers saves per expert
    shared_input=(*SHARED_INPUT, ("in_proj_qkv", "in_proj_z")),  # in_proj_a/b share the input too, but are kept
    kept_prefixes=("model.visual", "mtp"),
    notes="router, `shared_expert_gate`, linear attention `conv1d` / `in_proj_a` / `in_proj_b`, `model.visual*`, "
    "`mtp*`, embeddings, lm_head",
)  # fmt: skip

MIXTRAL = family(
    "Mixtral", ("MixtralForCausalLM",), ("mixtral",),
    quantized=(ATTENTION,),
    routed=(r"{L}\.block_sparse_moe\.experts\.{E}\.w[123]",),
    router=r"{L}\.block_sparse_moe\.gate",
    notes="router (`block_sparse_moe.gate`), embeddings, lm_head",
)  # fmt: skip

MINIMAX_M2 = replace(  # Mixtral's tensor names and rules
    MIXTRAL,
    name="MiniMax-M2",
    architectures=("MiniMaxM2ForCausalLM",),
    model_types=("minimax_m2",),
    notes="router + `e_score_correction_bias`, embeddings, lm_head",
)

LLAMA4 = family(
    "Llama-4 Scout / Maverick", ("Llama4ForConditionalGeneration", "Llama4ForCausalLM"), ("llama4", "llama4_text"),
    quantized=(ATTENTION, r"{L}\.feed_forward\.(?:shared_expert\.)?(?:gate|up|down)_proj"),
    routed=(),
    stacked=(r"{L}\.feed_forward\.experts\.(?:gate_up_proj|down_proj)",),
    router=r"{L}\.feed_forward\.router",
    kept_prefixes=("vision_model", "multi_modal_projector"),
    notes="router, embeddings, lm_head, `vision_model*`, `multi_modal_projector*`; experts stay stacked "
    "(one weight_scale_2 per layer and projection, as ModelOpt writes them)",
)  # fmt: skip

QWEN3_DENSE = family(
    "Qwen3 (dense)", ("Qwen3ForCausalLM",), ("qwen3",),
    quantized=(ATTENTION, DENSE_MLP),
    routed=(),
    notes="embeddings, lm_head (no routed experts: `--experts-only` keeps everything)",
)  # fmt: skip

LLAMA_DENSE = replace(
    QWEN3_DENSE, name="Llama (dense)", architectures=("LlamaForCausalLM",), model_types=("llama",)
)  # Qwen3's dense tensor names and rules, without q/k norms

FAMILIES = (
    QWEN3_MOE, DEEPSEEK_V3, GLM4_MOE, QWEN2_MOE, QWEN3_NEXT, QWEN3_5_MOE, MIXTRAL, MINIMAX_M2, LLAMA4,
    QWEN3_DENSE, LLAMA_DENSE,
)  # fmt: skip

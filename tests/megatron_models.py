"""Tiny megatron-core GPTModels (Qwen3-MoE, Qwen3 dense, Qwen2-MoE with a gated shared expert, a
dense-first Qwen3-MoE, Llama dense with every linear bias, GLM-4.5 with shared experts and a router expert bias,
Mixtral, a MoE with expert biases) and the transformers configs they mirror.

Every weight is a function of its *global* parameter name (global layer number, global expert index):
the whole tensor is drawn from that name's seed and this rank keeps the slice Megatron gives it, read from
Megatron's own partition attributes (``partition_dim``; a GLU ``linear_fc1`` holds [gate slice; up slice]).
So the same model built at any TP x PP x EP x ETP holds slices of one set of weights.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from transformers import Glm4MoeConfig, LlamaConfig, MixtralConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

EXPERTS, LAYERS, HIDDEN, MOE_FFN, FFN, SHARED_FFN = 4, 2, 64, 32, 128, 48
VOCAB, PADDED_VOCAB = 128, 144
"""The HF vocabulary and Megatron's padded one (divisible by TP 1, 2, 4): the exporter drops 16 rows."""

LAYOUTS = ("moe", "dense", "tied", "shared", "dense_first", "llama_bias", "glm", "mixtral", "moe_bias")
"""``tied``: the dense model with its output layer tied to the embedding; ``llama_bias``: dense, with q/k/v, o,
gate/up and down biases (``add_bias_linear``); ``glm``: dense first layer, then routed + shared experts, sigmoid
routing with ``expert_bias``, qkv bias, half rotary; ``moe_bias``: Qwen3-MoE with ``add_bias_linear`` (expert,
router, attention biases: no HF family has a router bias)."""
MOE = ("moe", "shared", "dense_first", "glm", "mixtral", "moe_bias")
SCALING = 2.5  # GLM's routed_scaling_factor / Megatron's moe_router_topk_scaling_factor

_HF_COMMON = dict(
    hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=32,
)  # fmt: skip


def hf_config(layout: str = "moe", scale: int = 1):
    """The transformers config the tiny GPTModel of ``layout`` mirrors (same sizes, RMSNorm eps, rope theta)."""
    if scale != 1:  # the benchmark's larger model: every width times ``scale``
        widths = dict(hidden_size=HIDDEN * scale, head_dim=16 * scale)
        return Qwen3MoeConfig(**{**_HF_COMMON, **widths}, intermediate_size=FFN * scale,
                              moe_intermediate_size=MOE_FFN * scale, num_experts=EXPERTS, num_experts_per_tok=2,
                              norm_topk_prob=True)  # fmt: skip
    if layout == "llama_bias":
        return LlamaConfig(**_HF_COMMON, intermediate_size=FFN, attention_bias=True, mlp_bias=True)
    if layout == "glm":
        return Glm4MoeConfig(
            **_HF_COMMON, intermediate_size=FFN, moe_intermediate_size=MOE_FFN, n_routed_experts=EXPERTS,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
            routed_scaling_factor=SCALING, norm_topk_prob=True, attention_bias=True, use_qk_norm=False,
            partial_rotary_factor=0.5,
        )  # fmt: skip
    if layout == "mixtral":
        return MixtralConfig(**_HF_COMMON, intermediate_size=MOE_FFN, num_local_experts=EXPERTS,
                             num_experts_per_tok=2)  # fmt: skip
    if layout in ("dense", "tied"):
        return Qwen3Config(**{**_HF_COMMON, "tie_word_embeddings": layout == "tied"}, intermediate_size=FFN)
    if layout == "shared":
        return Qwen2MoeConfig(
            **{k: v for k, v in _HF_COMMON.items() if k != "head_dim"}, intermediate_size=FFN,
            moe_intermediate_size=MOE_FFN, shared_expert_intermediate_size=SHARED_FFN, num_experts=EXPERTS,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        )  # fmt: skip
    return Qwen3MoeConfig(
        **_HF_COMMON, intermediate_size=FFN, moe_intermediate_size=MOE_FFN, num_experts=EXPERTS,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0] if layout == "dense_first" else [],
    )  # fmt: skip


def gpt_model(layout: str = "moe", dtype: torch.dtype = torch.bfloat16, *, seed: int = 0, scale: int = 1) -> GPTModel:
    """The GPTModel of ``layout`` at the parallelism ``parallel_state`` was initialized with (``scale``
    multiplies every width: the benchmark's larger model)."""
    moe = layout in MOE
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    dense_first = layout in ("dense_first", "glm")
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN * scale, num_attention_heads=4, num_query_groups=2,
        kv_channels=16 * scale, ffn_hidden_size=FFN * scale, gated_linear_unit=True, normalization="RMSNorm",
        qk_layernorm=layout in ("moe", "dense", "tied", "dense_first", "moe_bias"),
        add_bias_linear=layout in ("llama_bias", "moe_bias"), add_qkv_bias=layout in ("shared", "glm"),
        use_cpu_initialization=True, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, layernorm_epsilon=1e-5, activation_func=torch.nn.functional.silu,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp, pipeline_dtype=dtype,
        **(dict(
            num_moe_experts=EXPERTS, moe_ffn_hidden_size=MOE_FFN * scale, moe_router_topk=2,
            moe_layer_freq=[0, 1] if dense_first else 1,
        ) if moe else {}),
        **(dict(moe_shared_expert_intermediate_size=SHARED_FFN * scale, moe_shared_expert_gate=True)
           if layout == "shared" else {}),
        **(dict(moe_shared_expert_intermediate_size=MOE_FFN, moe_router_score_function="sigmoid",
                moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=SCALING)
           if layout == "glm" else {}),
    )  # fmt: skip
    if dense_first:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=EXPERTS if moe else None, moe_grouped_gemm=False, qk_layernorm=config.qk_layernorm,
            normalization="RMSNorm",
        )  # fmt: skip
    with _cpu_current_device():  # the router allocates expert_bias on torch.cuda.current_device()
        model = GPTModel(
            config, spec, vocab_size=PADDED_VOCAB, max_sequence_length=32,
            share_embeddings_and_output_weights=layout == "tied", position_embedding_type="rope", rotary_base=10000,
            rotary_percent=0.5 if layout == "glm" else 1.0,
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        ).to(dtype)  # fmt: skip
    fill_from_global_names(model, seed)
    return model


@contextmanager
def _cpu_current_device() -> Iterator[None]:
    """megatron-core 0.16.1's TopKRouter allocates ``expert_bias`` on ``torch.cuda.current_device()``, which a
    CPU-only torch refuses; "cpu" there is what ``use_cpu_initialization`` means."""
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = saved


def global_name(model: GPTModel, name: str) -> str:
    """The parameter's name in the TP = PP = EP = 1 model: global layer number, global expert index."""
    layers = model.decoder.layers
    name = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{layers[int(m[1])].layer_number - 1}.", name)
    local = (model.config.num_moe_experts or 0) // ps.get_expert_model_parallel_world_size()
    first = ps.get_expert_model_parallel_rank() * local
    return re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{first + int(m[1])}.", name)


def fill_from_global_names(model: GPTModel, seed: int = 0) -> None:
    """Draw each whole tensor from its global name's seed; keep this rank's slice as Megatron cuts it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            glob = global_name(model, name)
            expert = ".mlp.experts." in name
            rank, size = (
                (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
                if expert else (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
            )  # fmt: skip
            dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= size
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{glob}".encode()))
            norm = "layernorm" in name or name.endswith("norm.weight")
            whole = (1.0 if norm else 0.0) + (1.0 if norm else 0.2) * torch.randn(shape, generator=gen)
            if dim is None:
                p.copy_(whole)
            elif name.endswith(("linear_fc1.weight", "linear_fc1.bias")):  # GLU: [gate slice; up slice]
                p.copy_(torch.cat([half.chunk(size, dim)[rank] for half in whole.chunk(2, 0)]))
            else:
                p.copy_(whole.chunk(size, dim)[rank])
        for name, buffer in model.named_buffers():
            if name.endswith("router.expert_bias"):  # Megatron keeps it float32 (``_maintain_float32_expert_bias``)
                gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{global_name(model, name)}".encode()))
                buffer.data = 0.1 * torch.randn(buffer.shape, generator=gen)


def gpt_moe(dtype: torch.dtype = torch.bfloat16) -> GPTModel:
    """The Qwen3-MoE GPTModel (SequentialMLP experts) at the initialized parallelism."""
    return gpt_model("moe", dtype)

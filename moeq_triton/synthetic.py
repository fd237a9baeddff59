"""The embedded default checkpoint: a small SYNTHETIC Qwen3-MoE, generated deterministically on first use.

It lets the main job run on a fresh machine with nothing downloaded.  Weights are heavy-tailed (cubed
normals) with a few outlier input channels, so block scales span many binades like real weights do;
it is not a trained model and its outputs mean nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeq_triton.checkpoint.io import LOCK_SUFFIX, CheckpointError, RunLock, new_run_id, signals_deferred
from moeq_triton.kernels.native import cache_dir

NAME = "synthetic-qwen3-moe-4x16-v2"  # v2: written without transformers (other weights than v1)
SHAPE = dict(
    hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=2048,
    norm_topk_prob=True,
)  # fmt: skip


def heavy_tailed(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    *,
    scale: float = 1.0,
    outlier_columns: int = 0,
    outlier_gain: float = 30.0,
) -> torch.Tensor:
    """Cubed standard normals times ``scale``, with ``outlier_columns`` random input channels (last axis)
    multiplied by ``outlier_gain``: block scales then span many binades, as real weights' do.

    The one generator of heavy-tailed weights (default checkpoint, demo, tests, benchmarks); drawn on the
    CPU from ``generator`` so a seed gives the same tensor everywhere.
    """
    w = torch.randn(shape, generator=generator) ** 3
    if scale != 1.0:
        w = w * scale
    if outlier_columns:
        w[..., torch.randint(0, shape[-1], (outlier_columns,), generator=generator)] *= outlier_gain
    return w.to(dtype)


def default_checkpoint(seed: int = 0) -> Path:
    """Path of the default checkpoint, generated (atomically) if it is not there yet.

    Two first runs at once: the second waits on the cache's lock (a flock the kernel drops if the first
    dies) while the first writes, then finds the checkpoint complete.  A cache that cannot be written
    is one line naming it."""
    path = cache_dir() / NAME
    if (path / "config.json").is_file():
        return path
    lock = RunLock(path.parent / f".{NAME}{LOCK_SUFFIX}", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(wait=True)  # not with signals held back: a Ctrl-C while waiting ends the wait
        try:
            if not (path / "config.json").is_file():
                _generate(path, seed)
        finally:
            with signals_deferred():
                lock.release()
    except OSError as error:
        raise CheckpointError(
            f"{path}: cannot create the default checkpoint in the cache ({error.strerror or error}); "
            "set MOEQ_TRITON_CACHE to a writable directory or pass --model"
        ) from None
    return path


def _generate(path: Path, seed: int) -> None:
    """Write the checkpoint into a partial directory unique to this run, renamed into place at the end
    (called with the cache's lock held, so partials of killed runs are safe to discard)."""
    for stale in path.parent.glob(f".{NAME}.partial*"):
        shutil.rmtree(stale, ignore_errors=True)
    if path.exists():  # a directory without config.json: an interrupted copy of an older version
        shutil.rmtree(path)
    partial = path.parent / f".{NAME}.partial-{new_run_id()}"
    try:
        with signals_deferred():
            partial.mkdir()
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for name, shape in qwen3_moe_layout(SHAPE).items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                outliers = max(1, shape[-1] // 64)
                tensors[name] = heavy_tailed(shape, gen, torch.bfloat16, scale=0.02, outlier_columns=outliers)
        save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
        (partial / "config.json").write_text(json.dumps(qwen3_moe_config(SHAPE), indent=2) + "\n")
        with signals_deferred():
            partial.rename(path)
    finally:
        with signals_deferred():
            shutil.rmtree(partial, ignore_errors=True)


def qwen3_moe_config(shape: dict) -> dict:
    """config.json of a Qwen3-MoE checkpoint of this shape, as Qwen's own checkpoints spell it."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **shape,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def qwen3_moe_layout(shape: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen3-MoE checkpoint on disk (per-expert names, as transformers saves it): name -> shape.

    Written out so that the default checkpoint needs no transformers (the base install); a test checks
    it against transformers' own ``save_pretrained`` of the same config.
    """
    hidden, heads, kv_heads = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim, ffn, vocab = shape["head_dim"], shape["moe_intermediate_size"], shape["vocab_size"]
    layout: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        layout |= {
            f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"{prefix}.self_attn.q_norm.weight": (head_dim,),
            f"{prefix}.self_attn.k_norm.weight": (head_dim,),
            f"{prefix}.mlp.gate.weight": (shape["num_experts"], hidden),
        }
        for e in range(shape["num_experts"]):
            layout |= {
                f"{prefix}.mlp.experts.{e}.gate_proj.weight": (ffn, hidden),
                f"{prefix}.mlp.experts.{e}.up_proj.weight": (ffn, hidden),
                f"{prefix}.mlp.experts.{e}.down_proj.weight": (hidden, ffn),
            }
        layout |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
        }
    return layout | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}

"""The embedded default checkpoint: a small SYNTHETIC Qwen3-MoE, generated deterministically on first use.

It lets the main job run on a fresh machine with nothing downloaded.  Weights are heavy-tailed (cubed
normals) with a few outlier input channels, so block scales span many binades like real weights do;
it is not a trained model and its outputs mean nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .kernels.native import cache_dir

NAME = "synthetic-qwen3-moe-4x16"
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
    """Path of the default checkpoint, generated (atomically) if it is not there yet."""
    path = cache_dir() / NAME
    if (path / "config.json").is_file():
        return path
    try:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    except ImportError as error:
        raise ImportError(
            "the SYNTHETIC default checkpoint is generated with transformers: pip install 'moeq-triton[hf]', "
            "or pass --model DIR"
        ) from error

    config = Qwen3MoeConfig(**SHAPE)
    config.architectures = ["Qwen3MoeForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            p.copy_(heavy_tailed(p.shape, gen, p.dtype, scale=0.02, outlier_columns=max(1, p.shape[-1] // 64)))
    partial = path.parent / f".{NAME}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="20MB")
    if not path.exists():
        partial.rename(path)
    return path

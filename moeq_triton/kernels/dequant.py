"""Dequantization of block-scaled FP8 source weights (DeepSeek-V3, MiniMax-M2 checkpoints) to bf16.

``w[i, j] * s[i // 128, j // 128]`` in float32, rounded once to bf16: what DeepSeek's reference
``weight_dequant`` (inference/kernel.py) stores, so the result equals the bf16 weights their
``fp8_cast_bf16.py`` writes. Edge blocks are partial (dims need not be multiples of 128).
docs/numerics.md, section "FP8-block source dequantization".

The same computation inside the quantization kernels (an ``FP8BlockSource`` in a weight list) is
``dequant_jit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .formats import FP8_BLOCK_SIZE


class FP8BlockSource(NamedTuple):
    """A source weight stored as FP8-block codes (DeepSeek-V3/R1, Kimi-K2, MiniMax-M2 as released).

    Where a kernel accepts it in place of a bf16 weight, it computes on exactly the bf16 values
    ``dequantize_fp8_block_reference(codes, scale_inv)`` gives, without materializing them."""

    codes: torch.Tensor  # float8_e4m3fn [N, K]
    scale_inv: torch.Tensor  # float32 [ceil(N / 128), ceil(K / 128)]: one multiplier per 128x128 block

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self) -> torch.Tensor:
        """The bf16 weight this source stands for (plain torch)."""
        return dequantize_fp8_block_reference(self.codes, self.scale_inv)


def dequantized_sources(weights: Sequence) -> list:
    """The list with every FP8BlockSource replaced by its bf16 tensor: how the engines without a fused
    path (the torch references) see a source; the Triton kernels and the C loop read sources fused."""
    return [w.dequantize() if isinstance(w, FP8BlockSource) else w for w in weights]


def _check(i: int, weight: torch.Tensor, scale_inv: torch.Tensor, block: int) -> None:
    where = f"weights[{i}] (shape {tuple(weight.shape)}, dtype {weight.dtype})"
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"{where}: expected a 2-D float8_e4m3fn weight")
    rows, cols = weight.shape
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != expected or not scale_inv.is_floating_point():
        raise ValueError(
            f"{where}: its scale_inv has shape {tuple(scale_inv.shape)} ({scale_inv.dtype}); "
            f"expected a float tensor of shape {expected} for {block}x{block} blocks"
        )


def dequantize_fp8_block(
    weights: Sequence[torch.Tensor],
    scales_inv: Sequence[torch.Tensor],
    block: int = FP8_BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
) -> list[torch.Tensor]:
    """Every weight of a batch dequantized, one row of blocks at a time (extra memory: one float32
    row block, not a float32 copy of the tensor). Not fused into the quantization kernels yet."""
    if len(weights) != len(scales_inv):
        raise ValueError(f"{len(weights)} weights but {len(scales_inv)} scale_inv tensors")
    out = []
    for i, (weight, scale_inv) in enumerate(zip(weights, scales_inv)):
        _check(i, weight, scale_inv, block)
        rows, cols = weight.shape
        result = torch.empty(rows, cols, dtype=dtype, device=weight.device)
        scale = scale_inv.float()
        for b in range(scale.shape[0]):
            top = b * block
            column_scale = scale[b].repeat_interleave(block)[:cols]
            result[top : top + block] = (weight[top : top + block].float() * column_scale).to(dtype)
        out.append(result)
    return out


def dequantize_fp8_block_reference(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK_SIZE, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Plain torch: the scale expanded to the weight's shape, one float32 product, one rounding."""
    _check(0, weight, scale_inv, block)
    rows, cols = weight.shape
    expanded = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (weight.float() * expanded).to(dtype)

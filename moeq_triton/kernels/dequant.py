"""Dequantization of block-scaled FP8 source weights (DeepSeek-V3, MiniMax-M2 checkpoints) to bf16.

``w[i, j] * s[i // 128, j // 128]`` in float32, rounded once to bf16: what DeepSeek's reference
``weight_dequant`` (inference/kernel.py) stores, so the result equals the bf16 weights their
``fp8_cast_bf16.py`` writes. Edge blocks are partial (dims need not be multiples of 128).
docs/numerics.md, section "FP8-block source dequantization".

The jit helpers at the end are that same computation inside the quantization kernels (an
``FP8BlockSource`` in a weight list): the e4m3 code decoded exactly, one float32 product with its
block's scale, one round-to-nearest-even to bf16, kept as the float32 of that bf16 value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .formats import FP8_BLOCK_SIZE
from .rounding import round_to_dtype


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


# ---------------------------------------------------------------------------------------------- jit side

_E4M3_TO_FLOAT32 = tl.constexpr(2.0**120)  # e4m3 bits << 20 read as float32 are the value times 2^-120


@triton.jit
def e4m3_values(codes, HW: tl.constexpr):
    """Exact float32 values of float8_e4m3fn codes (a uint8 tensor); 0x7F / 0xFF are NaN.

    HW: the GPU's cvt.rn.f16x2.e4m3x2 (two codes per instruction; every e4m3 value is an f16) and f16 ->
    float32.  Otherwise bit placement: the 7 magnitude bits << 20 are a float32 (normal or subnormal)
    equal to the value times 2^-120, so one multiply by 2^120 is exact; the sign bit goes to bit 31."""
    if HW:
        return codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    b = codes.to(tl.int32)
    magnitude = b & 0x7F
    value = (magnitude << 20).to(tl.float32, bitcast=True) * _E4M3_TO_FLOAT32
    value = tl.where(magnitude == 0x7F, float("nan"), value)
    return ((b & 0x80) << 24 | value.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def bf16_round(p, HW: tl.constexpr):
    """float32 ``p`` rounded to the nearest bfloat16 (ties to even, subnormals kept), as a float32.

    HW: one cvt.rn.bf16x2.f32 with +0.0 as the low half: the packed result's bits are already the
    float32 of the bf16 value (no shift to widen it back).  Otherwise the bit rounding of round_to_dtype.
    tests/ptx_semantics.py defines the instruction for the interpreter."""
    if HW:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 z; mov.b32 z, 0; cvt.rn.bf16x2.f32 $0, $1, z; }",
            "=r,r",
            [p],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    return round_to_dtype(p, 1, False)


@triton.jit
def source_values(codes, scale, HW: tl.constexpr):
    """The bf16 values (as float32) that FP8-block codes stand for: fl32(e4m3 * scale) rounded to bf16,
    what ``dequantize_fp8_block_reference`` computes; ``scale`` broadcasts against ``codes``."""
    return bf16_round(e4m3_values(codes, HW) * scale, HW)


@triton.jit
def source_magnitude(x, HW: tl.constexpr):
    """|x| of ``source_values``' result.

    HW: an abs.f32 in inline asm.  LLVM rewrites a fabs of the inline asm's result (bf16_round) as an
    integer AND with 0x7FFFFFFF, a LOP3 per element that ptxas cannot fold as an |operand| modifier into
    the FMUL / FMNMX using it (issue 25; the bf16-source kernels get the fold).  Same bits: the sign bit
    cleared (a NaN's sign is unspecified by PTX; a NaN only flags the tensor non-finite).
    tests/ptx_semantics.py defines the instruction for the interpreter."""
    if HW:
        return tl.inline_asm_elementwise("abs.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    return tl.abs(x)

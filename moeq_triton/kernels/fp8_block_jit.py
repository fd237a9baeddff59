"""The Triton kernel of ``fp8_block``: FP8 codes and one scale per 128x128 block, a program per 128-row strip.

Imported by ``fp8_block`` on its first Triton launch, so the CPU paths never import triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .amax_jit import flag_nan
from .dequant_jit import bf16_round, e4m3_values, source_magnitude, source_values
from .formats import E4M3_MAX, FP8_BLOCK_SIZE, float32_reciprocal
from .fp8_jit import fp8_codes
from .grouping_jit import output_ptr, source_scales, tile_entry, weight_rows
from .rounding import divide_by_constant, divisor_parts

_BLOCK = tl.constexpr(FP8_BLOCK_SIZE)
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_INV_E4M3_MAX = tl.constexpr(float32_reciprocal(E4M3_MAX))


@triton.jit
def _load_float32(x_ptr, offsets, mask, BF16_BITS: tl.constexpr):
    """Exact float32 values of the weight.  bfloat16 goes through its bits: the interpreter's bf16 ->
    float32 cast flushes subnormals to zero (measured with triton 3.x), a widening shift cannot."""
    if BF16_BITS:
        bits = tl.load(x_ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + offsets, mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def fp8_block_kernel(
    table,
    tile_map,
    out_table,
    x_ref,
    nonfinite,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    STEP_R: tl.constexpr,
    TINY: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    BF16_BITS: tl.constexpr,
    HW: tl.constexpr,
    SOURCE: tl.constexpr,
):
    """One program per 128-row strip of one tensor (the launcher's tile); it walks the strip's 128x128
    blocks, each in two passes of [STEP_R, 128] steps: the block amax (a running max per thread, one
    reduction after the pass), then the codes (the block is read again, from cache).  Neither pass has a
    barrier or shuffle inside its loop.

    SOURCE (FP8-block source weights): an output block is a source block, under one source scale s; its
    amax is the largest code magnitude (an integer max of ``code & 0x7F``: the values are a
    non-decreasing function of it, and NaN, 0x7F, is the largest) decoded, times |s|, rounded to bf16."""
    t, strip, index, _ = tile_entry(tile_map)
    x_ptr, rows, K, stride = weight_rows(table, t, x_ref, ALIGNED, VEC)
    q_ptr = output_ptr(out_table, t, 0, tl.uint8, ALIGNED)
    s_ptr = output_ptr(out_table, t, 1, tl.float32, False)
    src_row = s_ptr  # the source's scale row (SOURCE)
    if SOURCE:
        x_ptr = x_ptr.to(tl.pointer_type(tl.uint8), bitcast=True)
        source_ptr, source_stride = source_scales(table, t, _BLOCK)
        src_row = source_ptr + strip * source_stride
    step_r = strip * _BLOCK + tl.arange(0, STEP_R)[:, None]
    blocks_k = (K + _BLOCK - 1) // _BLOCK
    seen = tl.zeros([], dtype=tl.float32)
    for kb in range(0, blocks_k):
        c = kb * _BLOCK + tl.arange(0, _BLOCK)[None, :]
        src_scale = 1.0
        if SOURCE:
            src_scale = tl.load(src_row + kb)
            top = tl.zeros([STEP_R, _BLOCK], dtype=tl.int32)
            for i in range(0, _BLOCK, STEP_R):
                r = step_r + i
                codes = tl.load(x_ptr + r * stride + c, mask=(r < rows) & (c < K), other=0)
                top = tl.maximum(top, codes.to(tl.int32) & 0x7F)
            top = tl.max(tl.max(top, axis=1), axis=0).to(tl.uint8)
            b = flag_nan(bf16_round(e4m3_values(top, HW) * tl.abs(src_scale), HW))
        else:
            acc = tl.zeros([STEP_R, _BLOCK], dtype=tl.float32)
            for i in range(0, _BLOCK, STEP_R):
                r = step_r + i
                x = _load_float32(x_ptr, r * stride + c, (r < rows) & (c < K), BF16_BITS)
                acc = tl.maximum(acc, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
            b = tl.max(tl.max(flag_nan(acc), axis=1), axis=0)  # once per block; inf when non-finite
        seen = tl.maximum(seen, b)
        b = tl.where(b == 0.0, _E4M3_MAX, tl.maximum(b, TINY))
        scale = divide_by_constant(b, _E4M3_MAX, _INV_E4M3_MAX, RECIPROCAL)
        tl.store(s_ptr + strip * blocks_k + kb, scale)
        minus_S, D, minus_inverse = divisor_parts(scale)  # HW: x / scale without a division
        minus_top = -512.0 * D
        for i in range(0, _BLOCK, STEP_R):
            r = step_r + i
            mask = (r < rows) & (c < K)
            if SOURCE:
                x = source_values(tl.load(x_ptr + r * stride + c, mask=mask, other=0), src_scale, HW)
                ax = source_magnitude(x, HW)
            else:
                x = _load_float32(x_ptr, r * stride + c, mask, BF16_BITS)
                ax = tl.abs(x)
            # ModelOpt divides by an expanded float32 tensor: the quotient stays float32 (kind 0)
            q = fp8_codes(x, ax, scale, minus_S, D, minus_inverse, minus_top, 0, HW)
            tl.store(q_ptr + r * K + c, q, mask=mask)
    if seen == float("inf"):  # once per strip
        tl.store(nonfinite + index, 1)

"""The Triton kernel of ``fp8``: FP8 (E4M3) codes and scales, per tensor or per channel, of every tile of
one dtype's table.

Imported by ``fp8`` on its first Triton launch, so the CPU paths never import triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .amax_jit import flag_nan, source_tile_abs_max, tile_abs_max
from .dequant_jit import source_magnitude, source_values
from .formats import E4M3_MAX, FP8_BLOCK_SIZE, float32_reciprocal
from .grouping_jit import output_ptr, source_scales, tile_entry, weight_rows
from .rounding import divide_by_constant, divisor_parts, e4m3_bits, e4m3_round, quotient, round_to_dtype, with_sign_of

_E4M3_MAX = tl.constexpr(E4M3_MAX)
_SOURCE_BLOCK = tl.constexpr(FP8_BLOCK_SIZE)
_INV_E4M3_MAX = tl.constexpr(float32_reciprocal(E4M3_MAX))


@triton.jit
def _export_scale(amax, TINY: tl.constexpr, RECIPROCAL: tl.constexpr):
    """ModelOpt's export scale: zero amax -> 448, clamp to the dtype's smallest normal, / 448."""
    amax = tl.where(amax == 0.0, _E4M3_MAX, tl.maximum(amax, TINY))
    return divide_by_constant(amax, _E4M3_MAX, _INV_E4M3_MAX, RECIPROCAL)


@triton.jit
def _e4m3_byte(q, HW: tl.constexpr):
    """float32 -> float8_e4m3fn byte, round half to even, saturating at 448 (NaN stays NaN)."""
    if HW:  # cvt.rn.satfinite.e4m3x2.f32
        return q.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    return e4m3_bits(e4m3_round(q))


@triton.jit
def fp8_codes(x, ax, divisor, minus_S, D, minus_inverse, minus_top, QUOTIENT_KIND: tl.constexpr, HW: tl.constexpr):
    """E4M3 bytes of x / divisor, the quotient first rounded to the weight dtype (QUOTIENT_KIND); ax is |x|
    (the caller's: FP8-block sources take it from source_magnitude)."""
    if HW:
        q = with_sign_of(quotient(tl.maximum(ax * minus_S, minus_top), D, minus_inverse), x)
    else:
        q = tl.div_rn(x, divisor)
    return _e4m3_byte(round_to_dtype(q, QUOTIENT_KIND, HW), HW)


@triton.jit
def fp8_kernel(
    table,
    tile_map,
    out_table,
    x_ref,
    amax,
    row_amax,
    nonfinite,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_ROW_AMAX: tl.constexpr,
    QUOTIENT_KIND: tl.constexpr,
    SCALE_KIND: tl.constexpr,
    TINY: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    HW: tl.constexpr,
    UNROLL: tl.constexpr,
    SOURCE: tl.constexpr,
):
    """SOURCE: the weights are FP8-block sources (codes + block scales); a step then covers one 128-column
    block (one scale per step: BLOCK_R divides 128, so a tile lies in one row of scales)."""
    t, tile, index, flat_row = tile_entry(tile_map)
    x_ptr, rows, K, stride = weight_rows(table, t, x_ref, ALIGNED, VEC)
    q_ptr = output_ptr(out_table, t, 0, tl.uint8, ALIGNED)
    s_ptr = output_ptr(out_table, t, 1, tl.float32, False)
    r1 = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    r = r1[:, None]
    row_mask = r < rows
    s_row = s_ptr  # the source's scale row (SOURCE)
    if SOURCE:
        x_ptr = x_ptr.to(tl.pointer_type(tl.uint8), bitcast=True)
        source_ptr, source_stride = source_scales(table, t, BLOCK_R)
        s_row = source_ptr + tile * BLOCK_R // _SOURCE_BLOCK * source_stride
    STEP: tl.constexpr = _SOURCE_BLOCK if SOURCE else BLOCK_K
    # a source step holds half the elements of a 16-bit one (128 columns, 8-bit codes): twice the unroll
    # keeps the loop's own instructions per element as low (issue 25's budget; 48 registers on sm_90)
    UNROLL_K: tl.constexpr = 2 * UNROLL if SOURCE else UNROLL

    if PER_CHANNEL:
        if HAS_ROW_AMAX:
            a = tl.load(row_amax + flat_row + r1)  # unmasked (the buffer is padded): no wait on the table
        elif SOURCE:
            a = tl.max(flag_nan(source_tile_abs_max(x_ptr, s_row, r1[:, None, None], rows, K, stride, HW)), axis=1)
        else:
            a = tl.max(flag_nan(tile_abs_max(x_ptr, r, rows, K, stride, BLOCK_R, BLOCK_K)), axis=1)
        scale = _export_scale(a, TINY, RECIPROCAL)
        tl.store(s_ptr + r1, scale, mask=r1 < rows)
        divisor = scale[:, None]
    else:
        scale = _export_scale(tl.load(amax + index), TINY, RECIPROCAL)
        if tile == 0:
            tl.store(s_ptr, scale)
        divisor = round_to_dtype(scale, SCALE_KIND, False)
    minus_S, D, minus_inverse = divisor_parts(divisor)  # HW: |x| / divisor without a division
    minus_top = -512.0 * D  # quotients above 512 saturate to 448 either way; the clamp keeps them finite

    # Loads need no mask: rows past the end re-read the last row (their stores are masked), and the
    # columns past the last whole STEP are one masked step after the loop.
    r_in = tl.minimum(r, rows - 1)
    k_full = K // STEP * STEP
    seen = tl.zeros([BLOCK_R, STEP], dtype=tl.float32)
    kb = 0  # SOURCE: this step's 128-column block, counted by the loop (k0 // 128 re-derived costs 5 SASS a step)
    for k0 in tl.range(0, k_full, STEP, loop_unroll_factor=UNROLL_K):
        c = k0 + tl.arange(0, STEP)[None, :]
        if SOURCE:
            codes = tl.load(x_ptr + r_in * stride + c)
            x = source_values(codes, tl.load(s_row + kb), HW)
            ax = source_magnitude(x, HW)
            kb += 1
        else:
            x = tl.load(x_ptr + r_in * stride + c).to(tl.float32)
            ax = tl.abs(x)
        seen = tl.maximum(seen, ax, propagate_nan=tl.PropagateNan.ALL)
        q = fp8_codes(x, ax, divisor, minus_S, D, minus_inverse, minus_top, QUOTIENT_KIND, HW)
        tl.store(q_ptr + r * K + c, q, mask=row_mask)
    if k_full < K:
        c = k_full + tl.arange(0, STEP)[None, :]
        if SOURCE:
            codes = tl.load(x_ptr + r_in * stride + c, mask=c < K, other=0)
            x = source_values(codes, tl.load(s_row + k_full // _SOURCE_BLOCK), HW)
            ax = source_magnitude(x, HW)
        else:
            x = tl.load(x_ptr + r_in * stride + c, mask=c < K, other=0.0).to(tl.float32)
            ax = tl.abs(x)
        seen = tl.maximum(seen, ax, propagate_nan=tl.PropagateNan.ALL)
        q = fp8_codes(x, ax, divisor, minus_S, D, minus_inverse, minus_top, QUOTIENT_KIND, HW)
        tl.store(q_ptr + r * K + c, q, mask=row_mask & (c < K))
    if tl.max(tl.max(flag_nan(seen), axis=1), axis=0) == float("inf"):  # once per tile
        tl.store(nonfinite + index, 1)

"""The Triton kernel of ``amax``: per-tensor or per-row max |w| over every tile of one dtype's table.

Imported by ``amax`` on its first Triton launch (CUDA, or the interpreter), so the CPU paths never import
triton; the other kernels' jit modules use its tile reductions.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant_jit import bf16_round, e4m3_values
from .formats import FP8_BLOCK_SIZE
from .grouping_jit import source_scales, tile_entry, weight_rows


@triton.jit
def tile_abs_max(x_ptr, r, rows, K, stride, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_R, BLOCK_K] running max of |x| over the rows ``r`` (int32 offsets); NaN propagates."""
    row_mask = r < rows
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)[None, :]
        x = tl.load(x_ptr + r * stride + c, mask=row_mask & (c < K), other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)), propagate_nan=tl.PropagateNan.ALL)
    return acc


_SOURCE_BLOCK = tl.constexpr(FP8_BLOCK_SIZE)
_GROUP = tl.constexpr(16)  # codes one thread reduces in registers (one 128-bit load)


@triton.jit
def source_tile_abs_max(x_ptr, s_row, r, rows, K, stride, HW: tl.constexpr):
    """[rows of r, 128 / 16] running max of |x| over the rows ``r`` ([BLOCK_R, 1, 1]) of an FP8-block source
    whose scale row is ``s_row``: exactly the max of the bf16 values the codes stand for, from the codes.

    Within one 128x128 block the value fl32(e4m3 * s) rounded to bf16 is a non-decreasing function of the
    code's magnitude byte (e4m3 magnitudes order as integers; both roundings are monotonic), so the max
    over 16 codes is the integer max of ``code & 0x7F`` (NaN, 0x7F, the largest: it decodes to NaN), and
    only that one code per 16 is decoded, scaled (by |s|) and rounded.  NaN propagates."""
    codes_ptr = x_ptr.to(tl.pointer_type(tl.uint8), bitcast=True)
    c3 = (tl.arange(0, _SOURCE_BLOCK // _GROUP) * _GROUP)[None, :, None] + tl.arange(0, _GROUP)[None, None, :]
    row_mask = r < rows
    acc = tl.zeros([r.shape[0], _SOURCE_BLOCK // _GROUP], dtype=tl.float32)
    for k0 in range(0, K, _SOURCE_BLOCK):
        c = k0 + c3
        codes = tl.load(codes_ptr + r * stride + c, mask=row_mask & (c < K), other=0)
        top = tl.max(codes & 0x7F, axis=2).to(tl.uint8)
        scale = tl.abs(tl.load(s_row + k0 // _SOURCE_BLOCK))
        x = bf16_round(e4m3_values(top, HW) * scale, HW)
        acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)
    return acc


@triton.jit
def flag_nan(a):
    """NaN -> inf, so that a non-finite weight is reported (a plain max would drop the NaN)."""
    return tl.where(a != a, float("inf"), a)


@triton.jit
def amax_kernel(
    table,
    tile_map,
    out_table,
    x_ref,
    amax_out,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_ROW: tl.constexpr,
    SOURCE: tl.constexpr,
    HW: tl.constexpr,
):
    t, tile, index, flat_row = tile_entry(tile_map)
    x_ptr, rows, K, stride = weight_rows(table, t, x_ref, ALIGNED, VEC)
    r1 = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    if SOURCE:  # an FP8-block source: BLOCK_R divides 128, so a tile lies in one row of scales
        s_ptr, s_stride = source_scales(table, t, BLOCK_R)
        s_row = s_ptr + tile * BLOCK_R // _SOURCE_BLOCK * s_stride
        acc = flag_nan(source_tile_abs_max(x_ptr, s_row, r1[:, None, None], rows, K, stride, HW))
    else:
        acc = flag_nan(tile_abs_max(x_ptr, r1[:, None], rows, K, stride, BLOCK_R, BLOCK_K))
    if PER_ROW:  # each row belongs to exactly one program: a plain store
        tl.store(amax_out + flat_row + r1, tl.max(acc, axis=1), mask=r1 < rows)
    else:
        tl.atomic_max(amax_out + index, tl.max(tl.max(acc, axis=1), axis=0))

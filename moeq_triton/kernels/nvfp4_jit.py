"""The Triton kernel of ``nvfp4``: E2M1 codes and E4M3 block scales of every tile of one dtype's table.

On the GPU path it is launched twice per dtype (``nvfp4.nvfp4_launches``): the common regime
(``formats.COMMON_AMAX_MIN``) and the general one.  Imported by ``nvfp4`` on its first Triton launch, so
the CPU paths never import triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .amax_jit import flag_nan
from .dequant_jit import source_values
from .formats import (
    COMMON_AMAX_MIN,
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    FP8_BLOCK_SIZE,
    NVFP4_BLOCK_SIZE,
    NVFP4_SCALE_2_DIVISOR,
    float32_reciprocal,
)
from .grouping_jit import output_ptr, source_scales, tile_entry, weight_rows
from .rounding import (
    E2M1_CODE_BIAS,
    approximate_reciprocal,
    common_quotient,
    divide_by_constant,
    divisor_parts,
    e2m1_biased_signed_code,
    e2m1_code,
    e4m3_bits,
    e4m3_round,
    quotient,
    refine_reciprocal,
    sign_bit_as_8,
)

_BLOCK = tl.constexpr(NVFP4_BLOCK_SIZE)
_HALF_BLOCK = tl.constexpr(NVFP4_BLOCK_SIZE // 2)
_DIVISOR = tl.constexpr(NVFP4_SCALE_2_DIVISOR)
_INV_DIVISOR = tl.constexpr(float32_reciprocal(NVFP4_SCALE_2_DIVISOR))
_E2M1_MAX = tl.constexpr(E2M1_MAX)
_SCALE_MIN = tl.constexpr(E4M3_MIN_SUBNORMAL)
_MIN_SUBNORMAL = tl.constexpr(2.0**-149)  # the smallest positive float32
_WORD_BIAS = tl.constexpr((E2M1_CODE_BIAS.value * 0x11111111 + 2**31) % 2**32 - 2**31)  # 8 biases, as int32
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_SOURCE_BLOCK = tl.constexpr(FP8_BLOCK_SIZE)
_COMMON_MIN = tl.constexpr(COMMON_AMAX_MIN)
_REDO_ABOVE = tl.constexpr(2.0**79)  # |x| / d <= 2^20.4 * |x| / amax (d >= 2^-9 * amax / 2688): <= 2^99.4


@triton.jit
def nvfp4_kernel(
    table,
    tile_map,
    out_table,
    x_ref,
    amax,
    nonfinite,
    redo,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCKS: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    HW: tl.constexpr,
    BF16: tl.constexpr,
    COMMON: tl.constexpr,
    AMAX_MAX: tl.constexpr,
    SOURCE: tl.constexpr,
):
    """One of two launches on the GPU path (HW): COMMON quantizes the tensors whose amax is in the common
    regime (see COMMON_AMAX_MIN), the other one the rest and the tensors the first flagged in ``redo``;
    each program of the wrong kind returns at once."""
    t, tile, index, _ = tile_entry(tile_map)
    a = tl.load(amax + index)
    run = tile >= 0
    if HW:
        common = (a >= _COMMON_MIN) & (a <= AMAX_MAX)  # NaN: not common
        if COMMON:
            run = common
        else:  # launched after the common one, on the same stream: its flags are written
            run = ~common | (tl.load(redo + index) != 0)
    if run:
        _nvfp4_tile(
            table,
            out_table,
            x_ref,
            nonfinite,
            redo,
            t,
            tile,
            index,
            a,
            ALIGNED,
            VEC,
            BLOCK_R,
            BLOCKS,
            RECIPROCAL,
            HW,
            BF16,
            COMMON,
            SOURCE,
        )


@triton.jit
def _nvfp4_tile(
    table,
    out_table,
    x_ref,
    nonfinite,
    redo,
    t,
    tile,
    index,
    a,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCKS: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    HW: tl.constexpr,
    BF16: tl.constexpr,
    COMMON: tl.constexpr,
    SOURCE: tl.constexpr,
):
    x_ptr, rows, K, stride = weight_rows(table, t, x_ref, ALIGNED, VEC)
    s_row = output_ptr(out_table, t, 2, tl.float32, False)  # unused unless SOURCE: the source's scale row
    if SOURCE:  # BLOCK_R divides 128: the tile lies in one row of source scales
        x_ptr = x_ptr.to(tl.pointer_type(tl.uint8), bitcast=True)
        source_ptr, source_stride = source_scales(table, t, BLOCK_R)
        s_row = source_ptr + tile * BLOCK_R // _SOURCE_BLOCK * source_stride
    q_ptr = output_ptr(out_table, t, 0, tl.int32, True)  # 8 codes per 32-bit word; K/2 % 8 == 0
    s_ptr = output_ptr(out_table, t, 1, tl.uint8, False)

    scale_2 = divide_by_constant(a, _DIVISOR, _INV_DIVISOR, RECIPROCAL)

    if tile == 0:
        tl.store(output_ptr(out_table, t, 2, tl.float32, False), scale_2)
    scale_unit = _E2M1_MAX * scale_2

    if HW and COMMON:  # scale_unit in [2^-73, 2^8]: divided without a prescale (rounding.common_quotient)
        minus_S_u, D_u, minus_I_u, Z_u = scale_unit, -scale_unit, tl.div_rn(1.0, scale_unit), scale_unit
    elif HW:  # the divisions by scale_unit (per block) and by each block's scale (per element), exactly
        minus_S_u, D_u, minus_I_u = divisor_parts(scale_unit)
        # IEEE's block amax / scale_unit is 0 iff block amax <= Z_u (see _codes); scale_unit == 0 is x / 0
        Z_u = tl.where(scale_unit == 0.0, -1.0, tl.floor(scale_unit * 0.5) * _MIN_SUBNORMAL)
    else:
        minus_S_u, D_u, minus_I_u, Z_u = scale_unit, scale_unit, scale_unit, scale_unit

    # A tile is [BLOCK_R rows, BLOCKS blocks, 8]: the first and the second half of each 16-block are
    # two 128-bit loads of the same thread, so the block amax, its scale and the packing of 8 codes
    # into one 32-bit word stay in registers (no shuffle, no barrier).  Loads need no mask: rows past
    # the end re-read the last row (their stores are masked), and the blocks past the last whole
    # BLOCKS are one masked step after the loop.
    r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    r2 = r[:, None]
    r_in = tl.minimum(r2, rows - 1)[:, :, None] * stride
    blk2 = tl.arange(0, BLOCKS)[None, :]
    j3 = tl.arange(0, _HALF_BLOCK)[None, None, :]
    nibble = (4 * j3).to(tl.int32)
    WORDS: tl.constexpr = HW and BF16 and ALIGNED and not SOURCE  # bf16 pairs as 32-bit words: one op unpacks each
    if WORDS:
        j3 = tl.arange(0, _HALF_BLOCK // 2)[None, None, :]  # word j holds elements 2j (low half), 2j + 1
        nibble = (8 * j3).to(tl.int32)
    num_blocks = K // _BLOCK
    seen = tl.zeros([BLOCK_R, BLOCKS], dtype=tl.float32)
    lanes = (r2, j3, nibble, WORDS)
    out = (q_ptr, s_ptr, K, scale_2)
    unit = (minus_S_u, D_u, minus_I_u, Z_u)  # the division by scale_unit
    start = 0
    if COMMON and (VEC == 8 or SOURCE):  # 16-bit weights or sources, K % 64 == 0: a step is BLOCKS groups of
        # 4 consecutive blocks, their 4 scales one 32-bit word (float32 weights: 42 BAR/SHFL per step
        # instead of 12, not taken)
        QUAD: tl.constexpr = 4 * BLOCKS
        start = tl.where(K % (4 * _BLOCK) == 0, num_blocks // QUAD * QUAD, 0)
        scale_words = s_ptr.to(tl.pointer_type(tl.int32), bitcast=True)  # row r at r * K / 64 words
        for b0 in range(0, start, QUAD):
            group = b0 // 4 + blk2
            seen = _nvfp4_quad_step(x_ptr + r_in, lanes, group, r2 < rows, out, unit, seen, scale_words, s_row, SOURCE)
    full = start + (num_blocks - start) // BLOCKS * BLOCKS  # the rest one block per lane, scales as bytes
    for b0 in range(start, full, BLOCKS):
        blk = b0 + blk2
        src_scale = _source_scale(s_row, blk // (_SOURCE_BLOCK // _BLOCK), None, SOURCE, False)
        seen = _nvfp4_step(x_ptr + r_in, lanes, blk, r2 < rows, out, unit, seen, src_scale, False, HW, COMMON, SOURCE)
    if full < num_blocks:
        blk = full + blk2
        mask = (r2 < rows) & (blk < num_blocks)
        src_scale = _source_scale(s_row, blk // (_SOURCE_BLOCK // _BLOCK), blk < num_blocks, SOURCE, True)
        seen = _nvfp4_step(x_ptr + r_in, lanes, blk, mask, out, unit, seen, src_scale, True, HW, COMMON, SOURCE)
    if tl.max(tl.max(flag_nan(seen), axis=1), axis=0) == float("inf"):  # once per tile
        tl.store(nonfinite + index, 1)
    if HW and COMMON:  # a weight far above a given amax can overflow x * fl(1/d) to a NaN whose sign bit
        # the hardware picks: the general launch redoes that tensor (below, every quotient is <= 2^100,
        # where tests/test_exact_division.py proves the codes and their signs)
        if tl.max(tl.max(seen, axis=1), axis=0) > a * _REDO_ABOVE:
            tl.store(redo + index, 1)


@triton.jit
def _source_scale(s_row, column_block, mask, SOURCE: tl.constexpr, MASKED: tl.constexpr):
    """The source scale of each lane's 16-blocks ([1, blocks]: the rows of a tile share it), or 0."""
    if SOURCE:
        if MASKED:
            return tl.load(s_row + column_block, mask=mask, other=0.0)
        return tl.load(s_row + column_block)
    return tl.zeros(column_block.shape, dtype=tl.float32)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nvfp4_quad_step(rows_ptr, lanes, group, mask, out, unit, seen, scale_words, s_row, SOURCE: tl.constexpr):
    """One common-regime step over [rows, groups of 4 consecutive blocks]: four block steps (block 4g + k
    in the k-th, so one thread holds all four) whose scale bytes leave as one 32-bit word per group."""
    r2 = lanes[0]
    K = out[2]
    # sources: the 64 columns of a group lie in one 128-column block, under one scale
    src = _source_scale(s_row, group // (_SOURCE_BLOCK // (4 * _BLOCK)), None, SOURCE, False)
    seen, s0 = _nvfp4_step(rows_ptr, lanes, 4 * group, mask, out, unit, seen, src, False, True, True, SOURCE, False)
    seen, s1 = _nvfp4_step(rows_ptr, lanes, 4 * group + 1, mask, out, unit, seen, src, False, True, True, SOURCE, False)
    seen, s2 = _nvfp4_step(rows_ptr, lanes, 4 * group + 2, mask, out, unit, seen, src, False, True, True, SOURCE, False)
    seen, s3 = _nvfp4_step(rows_ptr, lanes, 4 * group + 3, mask, out, unit, seen, src, False, True, True, SOURCE, False)
    tl.store(scale_words + r2 * (K // (4 * _BLOCK)) + group, s0 | (s1 << 8) | (s2 << 16) | (s3 << 24), mask=mask)
    return seen


@triton.jit
def _nvfp4_step(
    rows_ptr,
    lanes,
    blk,
    mask,
    out,
    unit,
    seen,
    src_scale,
    MASKED: tl.constexpr,
    HW: tl.constexpr,
    COMMON: tl.constexpr,
    SOURCE: tl.constexpr,
    STORE_SCALE: tl.constexpr = True,
):
    """One [rows, blocks] step: block scales (one byte each) and two 32-bit words of 8 codes per block.
    Without STORE_SCALE it returns (seen, the scale bytes as int32) and stores only the codes.

    lanes = (row, element-in-half-block, its nibble shift, WORDS); with WORDS (bf16 on the GPU path,
    aligned rows) the lane is a 32-bit word of two elements, the even one's nibble given, the odd one's
    4 above; with SOURCE rows_ptr points at e4m3 codes (8 per half-block: a 64-bit load) standing for
    bf16 values under the lane's ``src_scale``; out = (codes, scales, K, weight_scale_2);
    unit = divisor_parts of scale_unit and IEEE's zero threshold Z_u (see _nvfp4_tile); with COMMON
    (scale_unit, -scale_unit, +fl(1 / scale_unit), scale_unit)."""
    r2, j3, nibble, WORDS = lanes
    q_ptr, s_ptr, K, scale_2 = out
    minus_S_u, D_u, minus_I_u, Z_u = unit
    if WORDS:  # rows_ptr: bf16, 16-byte aligned rows; a word's low half is the even element
        col = blk[:, :, None] * _HALF_BLOCK + j3
        w_ptr = rows_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        if MASKED:
            lo_w = tl.load(w_ptr + col, mask=mask[:, :, None], other=0)
            hi_w = tl.load(w_ptr + col + _HALF_BLOCK // 2, mask=mask[:, :, None], other=0)
        else:
            lo_w = tl.load(w_ptr + col)
            hi_w = tl.load(w_ptr + col + _HALF_BLOCK // 2)
        lo = (lo_w << 16).to(tl.float32, bitcast=True)  # elements 0, 2, 4, 6 of the half-block
        lo_odd = (lo_w & -65536).to(tl.float32, bitcast=True)  # elements 1, 3, 5, 7
        hi = (hi_w << 16).to(tl.float32, bitcast=True)
        hi_odd = (hi_w & -65536).to(tl.float32, bitcast=True)
        both = tl.maximum(
            tl.maximum(tl.abs(lo), tl.abs(lo_odd), propagate_nan=tl.PropagateNan.ALL),
            tl.maximum(tl.abs(hi), tl.abs(hi_odd), propagate_nan=tl.PropagateNan.ALL),
            propagate_nan=tl.PropagateNan.ALL,
        )
    elif SOURCE:
        col = blk[:, :, None] * _BLOCK + j3
        if MASKED:
            lo_c = tl.load(rows_ptr + col, mask=mask[:, :, None], other=0)
            hi_c = tl.load(rows_ptr + col + _HALF_BLOCK, mask=mask[:, :, None], other=0)
        else:
            lo_c = tl.load(rows_ptr + col)
            hi_c = tl.load(rows_ptr + col + _HALF_BLOCK)
        lo = source_values(lo_c, src_scale[:, :, None], HW)
        hi = source_values(hi_c, src_scale[:, :, None], HW)
        lo_odd, hi_odd = lo, hi  # unused
        both = tl.maximum(tl.abs(lo), tl.abs(hi), propagate_nan=tl.PropagateNan.ALL)
    else:
        col = blk[:, :, None] * _BLOCK + j3
        if MASKED:
            lo = tl.load(rows_ptr + col, mask=mask[:, :, None], other=0.0).to(tl.float32)
            hi = tl.load(rows_ptr + col + _HALF_BLOCK, mask=mask[:, :, None], other=0.0).to(tl.float32)
        else:
            lo = tl.load(rows_ptr + col).to(tl.float32)
            hi = tl.load(rows_ptr + col + _HALF_BLOCK).to(tl.float32)
        lo_odd, hi_odd = lo, hi  # unused
        both = tl.maximum(tl.abs(lo), tl.abs(hi), propagate_nan=tl.PropagateNan.ALL)
    block_amax = tl.reduce(both, 2, _max_nan)
    seen = tl.maximum(seen, block_amax, propagate_nan=tl.PropagateNan.ALL)  # NaN blocks: reported, not stored
    if HW and COMMON:  # a non-zero block's quotient is >= 2^-141, never IEEE's 0; NaN (overflow) -> 448
        scale = tl.minimum(common_quotient(block_amax, D_u, minus_I_u), _E4M3_MAX)  # -unit, +fl(1/unit)
        scale = tl.where(block_amax == 0.0, 1.0, tl.maximum(scale, _SCALE_MIN))
    else:
        if HW:
            scale = quotient(block_amax * minus_S_u, D_u, minus_I_u)  # exact above 2^-100, tiny below
            # a prescaled block amax that overflows (a huge weight, a small given amax) makes it NaN: 448,
            # what its quotient (>= 2^127) saturates to (PTX min.f32 returns the non-NaN operand)
            scale = tl.minimum(scale, _E4M3_MAX)

            scale = tl.where(block_amax <= Z_u, 0.0, scale)  # IEEE's zero (-> 1.0); a tiny rest clamps to 2^-9
            x_over_zero = tl.where(block_amax == 0.0, float("nan"), float("inf"))
            scale = tl.where(Z_u < 0.0, x_over_zero, scale)  # scale_unit == 0 (weight_scale_2 underflowed)
        else:
            scale = tl.div_rn(block_amax, minus_S_u)  # minus_S_u is scale_unit here
        scale = tl.where(scale == 0.0, 1.0, scale)
        scale = tl.where(scale < _SCALE_MIN, _SCALE_MIN, scale)
    if HW:  # cvt.rn.satfinite.e4m3x2.f32, and back
        scale8 = scale.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        scale_bits = scale8.to(tl.uint8, bitcast=True)
        scale = scale8.to(tl.float32)
    else:
        scale = e4m3_round(scale)
        scale_bits = e4m3_bits(scale)
    if STORE_SCALE:
        tl.store(s_ptr + r2 * (K // _BLOCK) + blk, scale_bits, mask=mask)

    d = scale * scale_2
    if HW:
        if COMMON:  # d in [2^-85, 2^14]: 1/d normal, no special case for div.rn's branch to catch
            parts = (-d[:, :, None], refine_reciprocal(d, approximate_reciprocal(d))[:, :, None])
        else:
            minus_S, D, minus_I = divisor_parts(d)
            # x rounds to -0.0 (code 0, no sign) iff |x| / d <= 2^-150, i.e. |x| <= floor(d / 2) * 2^-149
            minus_Z = -(tl.floor(d * 0.5) * _MIN_SUBNORMAL)
            parts = (minus_S[:, :, None], D[:, :, None], minus_I[:, :, None], minus_Z[:, :, None])
        word_lo = _codes(lo, parts, nibble, COMMON)
        word_hi = _codes(hi, parts, nibble, COMMON)
        if WORDS:
            word_lo += _codes(lo_odd, parts, nibble + 4, COMMON)
            word_hi += _codes(hi_odd, parts, nibble + 4, COMMON)
        word_lo -= _WORD_BIAS
        word_hi -= _WORD_BIAS
    else:
        denom = d[:, :, None]
        word_lo = tl.sum(e2m1_code(tl.div_rn(lo, denom)) << nibble, axis=2)
        word_hi = tl.sum(e2m1_code(tl.div_rn(hi, denom)) << nibble, axis=2)
    words = q_ptr + r2 * (K // 8) + 2 * blk
    tl.store(words, word_lo, mask=mask)
    tl.store(words + 1, word_hi, mask=mask)
    if STORE_SCALE:
        return seen
    else:
        return seen, scale_bits.to(tl.int32)


@triton.jit
def _codes(x, parts, nibble, COMMON: tl.constexpr):
    """E2M1 codes of x / d (d = D / S; parts = (-S, D, -I, -Z), or with COMMON (-d, fl(1 / d))) packed
    into a 32-bit word at their nibbles, each plus E2M1_CODE_BIAS (the caller subtracts _WORD_BIAS once
    the word is whole)."""
    if COMMON:  # no quotient underflows to -0.0, and +-0.0 give +0.0: the sign bit of q is x < 0
        minus_d, J = parts
        q = common_quotient(x, minus_d, J)
        q, sign = tl.abs(q), sign_bit_as_8(q)
    else:  # the sign: x / d rounds below -0.0
        minus_S, D, minus_I, minus_Z = parts
        q, sign = quotient(tl.abs(x) * minus_S, D, minus_I), tl.where(x < minus_Z, 8, 0)
    biased = e2m1_biased_signed_code(q, sign)  # code + sign + E2M1_CODE_BIAS
    # the bias leaves once per word: sum((c_j + B) << 4j) - B * 0x11111111 == sum(c_j << 4j) mod 2^32
    return tl.sum(biased << nibble, axis=2)

"""FP8 (E4M3) weight quantization, per tensor or per output channel, one launch per dtype.

Bit-exact with ModelOpt's HF export (``get_scaling_factor`` -> ``TensorQuantizer.export_amax``):
- the scale: a zero (or NaN) amax becomes 448 (scale 1), the amax is clamped up to the weight dtype's
  smallest normal, then divided by 448 as torch divides by a Python number on the device (rounding.py);
- per tensor ("FP8"): torch keeps ``w / scale`` in the weight's dtype before the FP8 cast, so bf16/fp16
  round twice; on CUDA the 0-dim scale is itself first rounded to the weight dtype (an N-D weight is
  treated like its 2-D [rows, K] view, as ModelOpt treats a 2-D weight);
- per channel ("FP8_PER_CHANNEL_PER_TOKEN"): the quotient stays float32.
Steps and their rounding: docs/numerics.md, sections "FP8 per tensor" and "FP8 per channel".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import native
from .amax import amax_unchecked, check_amax, flag_nan, row_amax_unchecked, source_tile_abs_max, tile_abs_max
from .dequant import dequantized_sources, source_magnitude, source_values
from .formats import DTYPE_CODES, E4M3_MAX, FP8_BLOCK_SIZE
from .grouping import (
    Problems,
    Tiles,
    describe,
    engine_for,
    hardware_math,
    launch,
    num_rows,
    output_ptr,
    source_scales,
    tile_entry,
    tiles_for,
    use_triton,
    validate,
    weight_rows,
)
from .rounding import (
    casts_scalar_divisor,
    divide_by_constant,
    divides_by_reciprocal,
    divisor_parts,
    e4m3_bits,
    e4m3_round,
    float32_reciprocal,
    quotient,
    round_to_dtype,
    with_sign_of,
)


class FP8Weight(NamedTuple):
    weight: torch.Tensor  # float8_e4m3fn, same shape as the input
    weight_scale: torch.Tensor  # float32: 0-dim per tensor, input.shape[:-1] per channel


def fp8_layout(shape: Sequence[int], per_channel: bool) -> FP8Weight:
    """(shape, dtype) of each output for a weight of ``shape``: the format's layout, in one place."""
    scale_shape = tuple(shape[:-1]) if per_channel else ()
    return FP8Weight((tuple(shape), torch.float8_e4m3fn), (scale_shape, torch.float32))


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
def _fp8_kernel(
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


TILES = {"cuda": Tiles(16, 256, 4), "cpu": Tiles(64, 128)}  # benchmarks/tile_sweep.py measures others


def quantize_fp8(
    weights: Sequence[torch.Tensor],
    weight_amax: torch.Tensor | Sequence[torch.Tensor] | None = None,
    per_channel: bool = False,
) -> list[FP8Weight]:
    """FP8-quantize every weight; one launch per dtype (plus the amax pass per tensor when absent).

    weight_amax: per tensor, float32 [len(weights)]; per channel, one tensor per weight holding its
    row amaxes (numel = rows, e.g. a quantizer's [N, 1] amax).  When absent it is computed.
    """
    device = validate(weights)
    if device is None:
        return []
    problems = Problems(weights)
    if engine_for(device, native.enabled()) == "native":  # the C loop reads FP8-block sources fused
        return _quantize_native(weights, weight_amax, per_channel, device, problems)
    amax, row_amax = _amaxes(weights, weight_amax, per_channel, device, problems)
    if not use_triton(device):
        values = dequantized_sources(weights)
        if weight_amax is not None:  # otherwise the amax pass above has already checked
            problems.add_nonfinite(torch.stack([~torch.isfinite(w).all() for w in values]))
        problems.raise_first()
        rows = row_amax.split([num_rows(w) for w in weights]) if row_amax is not None else None
        return [
            quantize_fp8_reference(w, rows[i] if rows is not None else amax[i], per_channel)
            for i, w in enumerate(values)
        ]

    results = [
        FP8Weight(*(torch.empty(s, dtype=d, device=device) for s, d in fp8_layout(w.shape, per_channel)))
        for w in weights
    ]
    nonfinite = torch.zeros(len(weights), dtype=torch.int32, device=device)
    placeholder = torch.zeros(1, dtype=torch.float32, device=device)

    def per_dtype(dtype: torch.dtype) -> dict:
        kind = 0 if per_channel else DTYPE_CODES[dtype]  # per channel the quotient stays float32
        return {
            "QUOTIENT_KIND": kind,
            "SCALE_KIND": _scale_kind(kind, device),
            "TINY": torch.finfo(dtype).tiny,
            "UNROLL": 2 if kind else 1,  # two K steps per iteration where registers allow: 16-bit, per tensor
            # the same bytes per row step as 16-bit weights: float32 at the full width needs 168 registers
            # and spills (per channel, sm_90)
            "BLOCK_K": tiles.cols if dtype.itemsize <= 2 else tiles.cols // 2,
        }

    tiles = tiles_for(TILES, device)
    launch(
        "fp8",
        _fp8_kernel,
        weights,
        tiles,
        args=(
            amax if amax is not None else placeholder,
            # padded by a tile of rows: the kernel reads a tile's row amaxes without a mask
            torch.cat([row_amax, placeholder.new_zeros(tiles.rows)]) if row_amax is not None else placeholder,
            nonfinite,
        ),
        outputs=([r.weight for r in results], [r.weight_scale for r in results]),
        per_dtype=per_dtype,
        PER_CHANNEL=per_channel,
        HAS_ROW_AMAX=row_amax is not None,
        RECIPROCAL=divides_by_reciprocal(device),
        HW=hardware_math(device),
    )
    problems.add_nonfinite(nonfinite > 0)
    problems.raise_first()
    return results


def _quantize_native(
    weights: Sequence, weight_amax, per_channel: bool, device: torch.device, problems: Problems
) -> list[FP8Weight]:
    """The compiled C loop (CPU): one pass per weight; per channel it finds the row amaxes in that pass."""
    if per_channel and weight_amax is None:
        amaxes = [None] * len(weights)
    else:
        amax, row_amax = _amaxes(weights, weight_amax, per_channel, device, problems)
        problems.raise_first()  # a bad given amax is named before a non-finite weight, as on the other paths
        if per_channel:
            amaxes = list(row_amax.split([num_rows(w) for w in weights]))
        else:
            amaxes = list(amax)
    results = [
        FP8Weight(*(torch.empty(s, dtype=d, device=device) for s, d in fp8_layout(w.shape, per_channel)))
        for w in weights
    ]
    bad = native.fp8(weights, amaxes, results, per_channel)
    problems.add_nonfinite(torch.tensor([i in bad for i in range(len(weights))], dtype=torch.bool))
    problems.raise_first()
    return results


def _scale_kind(quotient_kind: int, device: torch.device) -> int:
    """The dtype the per-tensor scale is rounded to before the division (see casts_scalar_divisor)."""
    return quotient_kind if casts_scalar_divisor(device) else 0


def _amaxes(
    weights: Sequence[torch.Tensor],
    weight_amax: torch.Tensor | Sequence[torch.Tensor] | None,
    per_channel: bool,
    device: torch.device,
    problems: Problems,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(per-tensor amax [T], flat per-row amax) with exactly one of them set where it is known."""
    if not per_channel:
        if weight_amax is None:
            return amax_unchecked(weights, device, problems), None
        return check_amax(weights, weight_amax, device, problems), None
    if weight_amax is None:
        if use_triton(device):
            return None, None  # the kernel computes row amaxes in its first pass
        return None, row_amax_unchecked(weights, device, problems)
    if len(weight_amax) != len(weights):
        raise ValueError(f"weight_amax has {len(weight_amax)} entries for {len(weights)} weights")
    flat = []
    for i, (w, a) in enumerate(zip(weights, weight_amax)):
        a = a.to(device=device, dtype=torch.float32).reshape(-1)
        if a.numel() != num_rows(w):
            raise ValueError(f"weight_amax[{i}] has {a.numel()} values for {describe(i, w)} with {num_rows(w)} rows")
        flat.append(a)
    counts = torch.tensor([len(a) for a in flat], device=device)
    total = sum(len(a) for a in flat)
    tensor_of = torch.repeat_interleave(torch.arange(len(weights), device=device), counts, output_size=total)
    flat = torch.cat(flat)
    invalid = torch.zeros(len(weights), dtype=torch.int32, device=device)
    invalid.index_add_(0, tensor_of, (~(torch.isfinite(flat) & (flat >= 0))).int())

    def message(i: int) -> ValueError:
        return ValueError(f"weight_amax[{i}] for {describe(i, weights[i])}: values must be finite and >= 0")

    problems.add(invalid > 0, message)
    return None, flat


# ----------------------------------------------------------------------------------------------
# Reference: ModelOpt's export formula in plain torch, evaluated on the input's device.


def export_scale_reference(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale as ModelOpt's export_amax + get_scaling_factor compute it (float32, amax's device)."""
    amax = torch.where(amax == 0, E4M3_MAX, amax.float())
    return amax.clamp(min=torch.finfo(dtype).tiny) / E4M3_MAX


def quantize_fp8_reference(w: torch.Tensor, amax: torch.Tensor, per_channel: bool = False) -> FP8Weight:
    """Per tensor: ``(w / scale).to(e4m3)`` with a 0-dim scale, so torch divides in w's dtype; per
    channel the [rows] scale is a real tensor, so the quotient promotes to float32."""
    if per_channel:
        scale = export_scale_reference(amax.reshape(w.shape[:-1]), w.dtype)
        return FP8Weight((w / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale)
    scale = export_scale_reference(amax.reshape(()), w.dtype)
    return FP8Weight((w / scale).to(torch.float8_e4m3fn), scale)

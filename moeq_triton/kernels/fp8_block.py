"""FP8 (E4M3) weights with one float32 scale per 128x128 block, many weights in one launch per dtype.

This is the layout the engines run for MoE with dynamic activations (DeepSeek-V3, Qwen ``*-FP8``), with
the numbers of ModelOpt 0.47's ``FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG`` export (``FP8_PB_WO``):
- block amax b = max |w| over each 128x128 tile of the [N, K] weight (ragged edge tiles are zero-padded,
  which cannot change a max of magnitudes); held in the weight's dtype, so exact;
- ``export_amax``: b == 0 becomes 448 (scale 1.0), then b is clamped up to the dtype's smallest normal;
- scale = float32(b) / 448, divided as torch divides a tensor by a Python number on the device (rounding.py);
- codes = e4m3(float32(w) / scale): ``FP8QTensor.quantize`` divides by an expanded float32 tensor, so the
  quotient promotes to float32 and is rounded once (unlike per-tensor FP8, which stays in the weight dtype).
The scale is stored as the engines name it, ``weight_scale_inv`` [ceil(N/128), ceil(K/128)]; ModelOpt's own
export writes the same values as ``weight_scale`` shaped (ceil(N/128), 1, ceil(K/128), 1).
Steps and their rounding: docs/numerics.md, section "FP8 block (128x128)".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import native
from .amax import flag_nan
from .dequant import FP8BlockSource, bf16_round, dequantized_sources, e4m3_values, source_magnitude, source_values
from .formats import E4M3_MAX, FP8_BLOCK_SIZE
from .fp8 import fp8_codes
from .grouping import (
    MAX_ENTRY_ELEMENTS,
    NonFiniteWeightError,
    Problems,
    Tiles,
    describe,
    engine_for,
    hardware_math,
    launch,
    output_ptr,
    row_stride,
    source_scales,
    tile_entry,
    tiles_for,
    use_triton,
    validate,
    weight_rows,
)
from .rounding import divide_by_constant, divides_by_reciprocal, divisor_parts, float32_reciprocal


class FP8BlockWeight(NamedTuple):
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    weight_scale_inv: torch.Tensor  # float32 [ceil(N/128), ceil(K/128)]; dequantized = weight * scale per tile


def fp8_block_layout(shape: Sequence[int]) -> FP8BlockWeight:
    """(shape, dtype) of each output for a weight of ``shape``: the format's layout, in one place."""
    n, k = shape
    blocks = (math.ceil(n / FP8_BLOCK_SIZE), math.ceil(k / FP8_BLOCK_SIZE))
    return FP8BlockWeight((tuple(shape), torch.float8_e4m3fn), (blocks, torch.float32))


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
def _fp8_block_kernel(
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


TILES = {"cuda": Tiles(FP8_BLOCK_SIZE, 32, 8), "cpu": Tiles(FP8_BLOCK_SIZE, FP8_BLOCK_SIZE)}
"""A program per 128-row strip (one scale covers one block, so rows are fixed); ``cols`` is the
rows of one loop step (STEP_R): on CUDA 32 rows x 128 columns, 16 elements per thread of 8 warps; in
the interpreter the whole block in one step."""


def _quantize_native(weights: Sequence, device: torch.device) -> list[FP8BlockWeight]:
    """The compiled C loop (CPU): one pass per weight over its 128-row strips."""
    results = [
        FP8BlockWeight(*(torch.empty(s, dtype=d, device=device) for s, d in fp8_block_layout(w.shape))) for w in weights
    ]
    bad = native.fp8_block(weights, results)
    if bad:
        raise NonFiniteWeightError(bad[0], describe(bad[0], weights[bad[0]]))
    return results


def _dtype_constexprs(dtype: torch.dtype) -> dict:
    return {"TINY": torch.finfo(dtype).tiny, "BF16_BITS": dtype == torch.bfloat16}


def quantize_fp8_block(weights: Sequence[torch.Tensor | FP8BlockSource]) -> list[FP8BlockWeight]:
    """FP8-block-quantize every 2-D weight (or FP8-block source); one launch per dtype and one for the
    sources, no amax pass (block amaxes are local).

    Raises NonFiniteWeightError naming the first weight that holds NaN or Inf.
    """
    device = validate(weights)
    if device is None:
        return []
    for i, w in enumerate(weights):
        if len(w.shape) != 2:
            raise ValueError(
                f"{describe(i, w)}: FP8 blocks are 128x128 tiles of a 2-D [out, in] weight; "
                "pass each expert's 2-D view of a stacked parameter"
            )
        if w.shape[0] * w.shape[1] and (w.shape[0] - 1) * row_stride(i, w) + w.shape[1] > MAX_ENTRY_ELEMENTS:
            raise ValueError(f"{describe(i, w)}: spans more than 2**31 elements; split it into row blocks of 128")
    if engine_for(device, native.enabled()) == "native":  # the C loop reads FP8-block sources fused
        return _quantize_native(weights, device)
    if not use_triton(device):
        values = dequantized_sources(weights)
        bad = [i for i, w in enumerate(values) if not bool(torch.isfinite(w).all())]
        if bad:
            raise NonFiniteWeightError(bad[0], describe(bad[0], weights[bad[0]]))
        return [quantize_fp8_block_reference(w) for w in values]

    results = [
        FP8BlockWeight(*(torch.empty(s, dtype=d, device=device) for s, d in fp8_block_layout(w.shape))) for w in weights
    ]
    nonfinite = torch.zeros(len(weights), dtype=torch.int32, device=device)
    step = tiles_for(TILES, device)
    outputs = [[r.weight for r in results], [r.weight_scale_inv for r in results]]
    constexprs = {"STEP_R": step.cols, "RECIPROCAL": divides_by_reciprocal(device), "HW": hardware_math(device)}
    launch(
        "fp8_block",
        _fp8_block_kernel,
        weights,
        step,
        args=(nonfinite,),
        outputs=outputs,
        per_dtype=_dtype_constexprs,
        **constexprs,
    )
    problems = Problems(weights)
    problems.add_nonfinite(nonfinite > 0)
    problems.raise_first()
    return results


# ----------------------------------------------------------------------------------------------
# Reference: ModelOpt's FP8_PB_WO export formula in plain torch, evaluated on the input's device.


def quantize_fp8_block_reference(w: torch.Tensor) -> FP8BlockWeight:
    """Zero-pad to whole blocks, block amax in w's dtype, export_amax's fix-ups, / 448, float32 quotient."""
    n, k = w.shape
    bn, bk = math.ceil(n / FP8_BLOCK_SIZE), math.ceil(k / FP8_BLOCK_SIZE)
    padded = torch.nn.functional.pad(w, (0, bk * FP8_BLOCK_SIZE - k, 0, bn * FP8_BLOCK_SIZE - n))
    tiles = padded.reshape(bn, FP8_BLOCK_SIZE, bk, FP8_BLOCK_SIZE)
    amax = tiles.abs().amax(dim=(1, 3))
    amax = torch.where(amax == 0, torch.full_like(amax, E4M3_MAX), amax).clamp(min=torch.finfo(w.dtype).tiny)
    scale = amax.float() / E4M3_MAX
    codes = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return FP8BlockWeight(codes.reshape(padded.shape)[:n, :k].contiguous(), scale)

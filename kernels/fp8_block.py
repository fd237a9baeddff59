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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .formats import E4M3_MAX, FP8_BLOCK_SIZE
from .grouping import (
    MAX_ENTRY_ELEMENTS,
    NonFiniteWeightError,
    Problems,
    Tiles,
    describe,
    launch,
    output_ptr,
    row_stride,
    tile_entry,
    tiles_for,
    use_triton,
    validate,
    weight_rows,
)
from .rounding import divide_by_constant, divides_by_reciprocal, e4m3_bits, e4m3_round, float32_reciprocal


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
    TINY: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """One program per 128-row strip of one tensor (the launcher's tile); it walks the strip's 128x128 blocks."""
    t, strip, index, _ = tile_entry(tile_map)
    x_ptr, rows, K, stride = weight_rows(table, t, x_ref, ALIGNED, VEC)
    q_ptr = output_ptr(out_table, t, 0, tl.uint8, ALIGNED)
    s_ptr = output_ptr(out_table, t, 1, tl.float32, False)
    r = strip * _BLOCK + tl.arange(0, _BLOCK)[:, None]
    row_mask = r < rows
    blocks_k = (K + _BLOCK - 1) // _BLOCK
    bad = 0
    for kb in range(0, blocks_k):
        c = kb * _BLOCK + tl.arange(0, _BLOCK)[None, :]
        mask = row_mask & (c < K)
        x = _load_float32(x_ptr, r * stride + c, mask, BF16_BITS)
        a = tl.abs(x)
        bad += tl.sum(tl.sum(tl.where(a < float("inf"), 0, 1), axis=1), axis=0)
        b = tl.max(tl.max(a, axis=1), axis=0)
        b = tl.where(b == 0.0, _E4M3_MAX, tl.maximum(b, TINY))
        scale = divide_by_constant(b, _E4M3_MAX, _INV_E4M3_MAX, RECIPROCAL)
        tl.store(s_ptr + strip * blocks_k + kb, scale)
        q = e4m3_round(tl.div_rn(x, scale))
        tl.store(q_ptr + r * K + c, e4m3_bits(q), mask=mask)
    tl.atomic_max(nonfinite + index, bad)


TILES = {"cuda": Tiles(FP8_BLOCK_SIZE, FP8_BLOCK_SIZE, 8), "cpu": Tiles(FP8_BLOCK_SIZE, FP8_BLOCK_SIZE)}
"""One 128x128 block per loop step: the block is the unit of the scale, so the tile is fixed."""


def quantize_fp8_block(weights: Sequence[torch.Tensor]) -> list[FP8BlockWeight]:
    """FP8-block-quantize every 2-D weight; one launch per dtype, no amax pass (block amaxes are local).

    Raises NonFiniteWeightError naming the first weight that holds NaN or Inf.
    """
    device = validate(weights)
    if device is None:
        return []
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(
                f"{describe(i, w)}: FP8 blocks are 128x128 tiles of a 2-D [out, in] weight; "
                "pass each expert's 2-D view of a stacked parameter"
            )
        if w.numel() and (w.shape[0] - 1) * row_stride(i, w) + w.shape[1] > MAX_ENTRY_ELEMENTS:
            raise ValueError(f"{describe(i, w)}: spans more than 2**31 elements; split it into row blocks of 128")
    if not use_triton(device):
        bad = [i for i, w in enumerate(weights) if not bool(torch.isfinite(w).all())]
        if bad:
            raise NonFiniteWeightError(bad[0], describe(bad[0], weights[bad[0]]))
        return [quantize_fp8_block_reference(w) for w in weights]

    results = [
        FP8BlockWeight(*(torch.empty(s, dtype=d, device=device) for s, d in fp8_block_layout(w.shape))) for w in weights
    ]
    outs = [[r.weight for r in results], [r.weight_scale_inv for r in results]]
    nonfinite = torch.zeros(len(weights), dtype=torch.int32, device=device)
    tiles = tiles_for(TILES, device)
    launch(
        "fp8_block",
        _fp8_block_kernel,
        weights,
        tiles,
        (nonfinite,),
        outputs=outs,
        per_dtype=lambda dtype: {"TINY": torch.finfo(dtype).tiny, "BF16_BITS": dtype == torch.bfloat16},
        RECIPROCAL=divides_by_reciprocal(device),
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

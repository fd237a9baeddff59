"""Per-tensor and per-row amax (max |w|) of many weights in one launch per dtype.

This is the whole of weight calibration for the ``max`` method: it reads every weight byte once,
so its speed of light is a single read pass over the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import native
from .dequant import bf16_round, dequantized_sources, e4m3_values
from .formats import FP8_BLOCK_SIZE
from .grouping import (
    NonFiniteWeightError,
    Problems,
    Tiles,
    engine_for,
    hardware_math,
    launch,
    num_rows,
    source_scales,
    tile_entry,
    tiles_for,
    validate,
    weight_rows,
)

__all__ = ["NonFiniteWeightError", "grouped_amax", "grouped_amax_reference", "grouped_row_amax"]


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
def _amax_kernel(
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


TILES = {"cuda": Tiles(16, 256, 4), "cpu": Tiles(64, 256)}  # benchmarks/tile_sweep.py measures others


def grouped_amax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """float32 [len(weights)]: max |w| of each tensor, one launch per dtype.

    Raises NonFiniteWeightError (a ValueError) naming the first tensor that holds NaN or Inf.
    """
    device = validate(weights)
    if device is None:
        return torch.empty(0, dtype=torch.float32)
    problems = Problems(weights)
    amax = amax_unchecked(weights, device, problems)
    problems.raise_first()
    return amax


def amax_unchecked(weights: Sequence[torch.Tensor], device: torch.device, problems: Problems) -> torch.Tensor:
    """The amax pass for validated weights; non-finite weights are added to ``problems`` (no host read)."""
    engine = engine_for(device, native.enabled())
    if engine == "triton":
        amax = torch.zeros(len(weights), dtype=torch.float32, device=device)
        tiles = tiles_for(TILES, device)
        launch(
            "amax",
            _amax_kernel,
            weights,
            tiles,
            args=(amax,),
            BLOCK_K=tiles.cols,
            PER_ROW=False,
            HW=hardware_math(device),
        )
    elif engine == "native":
        amax = native.amax(weights)  # FP8-block sources read fused
    else:
        amax = grouped_amax_reference(dequantized_sources(weights))
    problems.add_nonfinite(~torch.isfinite(amax))
    return amax


def grouped_row_amax(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """float32 [rows] per tensor (max |w| over the last dim of each row), one launch per dtype.

    The per-channel amax of a weight quantizer with axis 0; rows = all dims but the last.
    """
    device = validate(weights)
    if device is None:
        return []
    problems = Problems(weights)
    flat = row_amax_unchecked(weights, device, problems)
    problems.raise_first()
    return list(flat.split([num_rows(w) for w in weights]))


def row_amax_unchecked(weights: Sequence[torch.Tensor], device: torch.device, problems: Problems) -> torch.Tensor:
    """Flat float32 [sum of rows] row amaxes of validated weights; non-finite rows go to ``problems``."""
    rows = [num_rows(w) for w in weights]
    if use_kernels(device):
        flat = torch.zeros(sum(rows), dtype=torch.float32, device=device)
        tiles = tiles_for(TILES, device)
        hw = hardware_math(device)
        launch("row_amax", _amax_kernel, weights, tiles, args=(flat,), BLOCK_K=tiles.cols, PER_ROW=True, HW=hw)
    else:
        parts = [w.abs().amax(-1).float().reshape(-1) for w in dequantized_sources(weights) if w.numel()]
        flat = torch.cat(parts) if parts else torch.zeros(0, device=device)
    tensor_of = torch.repeat_interleave(
        torch.arange(len(weights), device=device), torch.tensor(rows, device=device), output_size=sum(rows)
    )
    bad_rows = torch.zeros(len(weights), dtype=torch.int32, device=device)
    problems.add_nonfinite(bad_rows.index_add_(0, tensor_of, (~torch.isfinite(flat)).int()) > 0)
    return flat


def use_kernels(device: torch.device) -> bool:
    return engine_for(device, False) == "triton"


def check_amax(weights: Sequence[torch.Tensor], weight_amax, device: torch.device, problems: Problems) -> torch.Tensor:
    """The caller's per-tensor amax as float32 [len(weights)] on the device; bad values go to ``problems``."""
    amax = torch.as_tensor(weight_amax).to(device=device, dtype=torch.float32).reshape(-1)
    if amax.numel() != len(weights):
        raise ValueError(f"weight_amax has {amax.numel()} values for {len(weights)} weights")

    def message(i: int) -> ValueError:
        return ValueError(f"weight_amax[{i}] = {amax[i].item()} for weights[{i}]: must be finite and >= 0")

    problems.add(~torch.isfinite(amax) | (amax < 0), message)
    return amax


def grouped_amax_reference(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain torch: amax of each tensor in its own dtype (exact), then float32; NaN stays NaN."""
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return torch.stack([w.abs().amax().float() if w.numel() else w.new_zeros((), dtype=torch.float32) for w in weights])

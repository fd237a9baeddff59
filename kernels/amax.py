"""Per-tensor amax (max |w|) of many weights in one launch per dtype.

This is the whole of weight calibration for the ``max`` method: it reads every weight byte once,
so its speed of light is a single read pass over the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import native
from .grouping import (
    Tiles,
    build_groups,
    count_launch,
    describe,
    entry,
    locate,
    num_rows,
    row_offsets,
    tiles_for,
    use_triton,
    validate,
)


@triton.jit
def _amax_kernel(
    table,
    amax_out,
    ref_ptr,
    T,
    STEPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_ROW: tl.constexpr,
):
    pid = tl.program_id(0)
    t = locate(table, pid, T, STEPS)
    ptr, rows, K, stride, tile_start, index, row_offset = entry(table, t)
    x_ptr = ptr.to(ref_ptr.dtype)
    r = (pid - tile_start) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    row_mask = r < rows
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)[None, :]
        x = tl.load(x_ptr + r * stride + c, mask=row_mask & (c < K), other=0.0).to(tl.float32)
        a = tl.abs(x)
        acc = tl.maximum(acc, tl.where(a != a, float("inf"), a))  # NaN -> inf: reported, not lost
    if PER_ROW:  # each row belongs to exactly one program: a plain store
        r1 = (pid - tile_start) * BLOCK_R + tl.arange(0, BLOCK_R)
        tl.store(amax_out + row_offset + r1, tl.max(acc, axis=1), mask=r1 < rows)
    else:
        tl.atomic_max(amax_out + index, tl.max(tl.max(acc, axis=1), axis=0))


TILES = {"cuda": Tiles(16, 256, 4), "cpu": Tiles(64, 256)}  # benchmarks/tile_sweep.py measures others


def grouped_amax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """float32 [len(weights)]: max |w| of each tensor, one launch per dtype.

    Raises ValueError naming the first tensor that holds NaN or Inf.
    """
    device = validate(weights)
    if device is None:
        return torch.empty(0, dtype=torch.float32)
    if not use_triton(device):
        amax = native.amax(weights) if native.enabled() else grouped_amax_reference(weights)
    else:
        amax = torch.zeros(len(weights), dtype=torch.float32, device=device)
        _launch(weights, amax, per_row=False)
    report_nonfinite(weights, ~torch.isfinite(amax))
    return amax


def grouped_row_amax(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """float32 [rows] per tensor (max |w| over the last dim of each row), one launch per dtype.

    The per-channel amax of a weight quantizer with axis 0; rows = all dims but the last.
    """
    device = validate(weights)
    if device is None:
        return []
    rows = [num_rows(w) for w in weights]
    if not use_triton(device):
        parts = [w.abs().amax(-1).float().reshape(-1) for w in weights if w.numel()]
        flat = torch.cat(parts) if parts else torch.zeros(0, device=device)
    else:
        flat = torch.zeros(sum(rows), dtype=torch.float32, device=device)
        _launch(weights, flat, per_row=True, offsets=row_offsets(weights))
    owner = torch.repeat_interleave(torch.arange(len(weights), device=device), torch.tensor(rows, device=device))
    bad = torch.zeros(len(weights), dtype=torch.bool, device=device)
    report_nonfinite(weights, bad.index_fill_(0, owner[~torch.isfinite(flat)], True))
    return list(flat.split(rows))


def _launch(weights: Sequence[torch.Tensor], out: torch.Tensor, per_row: bool, offsets=None) -> None:
    tiles = tiles_for(TILES, out.device)
    for g in build_groups(weights, tiles.rows, aux=offsets):
        if g.num_tiles:
            _amax_kernel[(g.num_tiles,)](
                g.table,
                out,
                weights[g.first],
                len(g.indices),
                g.search_steps,
                tiles.rows,
                tiles.cols,
                per_row,
                num_warps=tiles.warps,
            )
            count_launch("row_amax" if per_row else "amax")


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or Inf; ``index`` is its position in the caller's list."""

    def __init__(self, index: int, description: str) -> None:
        super().__init__(f"{description} contains NaN or Inf; refusing to quantize it")
        self.index = index


def report_nonfinite(weights: Sequence[torch.Tensor], bad: torch.Tensor) -> None:
    """One host sync: fail on the first tensor flagged in the bool vector ``bad``."""
    bad = bad.nonzero()
    if len(bad):
        i = int(bad[0])
        raise NonFiniteWeightError(i, describe(i, weights[i]))


def resolve_amax(
    weights: Sequence[torch.Tensor], weight_amax: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """The caller's amax as float32 [len(weights)] on the device, or the grouped amax pass."""
    if weight_amax is None:
        return grouped_amax(weights)
    amax = torch.as_tensor(weight_amax).to(device=device, dtype=torch.float32).reshape(-1)
    if amax.numel() != len(weights):
        raise ValueError(f"weight_amax has {amax.numel()} values for {len(weights)} weights")
    bad = (~torch.isfinite(amax) | (amax < 0)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"weight_amax[{i}] = {amax[i].item()} for weights[{i}]: must be finite and >= 0")
    return amax


def grouped_amax_reference(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain torch: amax of each tensor in its own dtype (exact), then float32; NaN stays NaN."""
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return torch.stack([w.abs().amax().float() if w.numel() else w.new_zeros((), dtype=torch.float32) for w in weights])

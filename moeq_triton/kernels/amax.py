"""Per-tensor and per-row amax (max |w|) of many weights in one launch per dtype.

This is the whole of weight calibration for the ``max`` method: it reads every weight byte once,
so its speed of light is a single read pass over the weights.

The launcher, the C-loop dispatch and the torch reference are here; the Triton kernel is ``amax_jit``, imported on
the first Triton launch (so the CPU paths never import triton).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import native
from .dequant import dequantized_sources
from .grouping import (
    NonFiniteWeightError,
    Problems,
    Tiles,
    engine_for,
    hardware_math,
    launch,
    num_rows,
    tiles_for,
    validate,
)

__all__ = ["NonFiniteWeightError", "grouped_amax", "grouped_amax_reference", "grouped_row_amax"]


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
        from .amax_jit import amax_kernel  # triton is imported on the first launch only

        amax = torch.zeros(len(weights), dtype=torch.float32, device=device)
        tiles = tiles_for(TILES, device)
        launch(
            "amax",
            amax_kernel,
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
        from .amax_jit import amax_kernel

        flat = torch.zeros(sum(rows), dtype=torch.float32, device=device)
        tiles = tiles_for(TILES, device)
        hw = hardware_math(device)
        launch("row_amax", amax_kernel, weights, tiles, args=(flat,), BLOCK_K=tiles.cols, PER_ROW=True, HW=hw)
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

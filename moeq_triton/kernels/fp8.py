"""FP8 (E4M3) weight quantization, per tensor or per output channel, one launch per dtype.

Bit-exact with ModelOpt's HF export (``get_scaling_factor`` -> ``TensorQuantizer.export_amax``):
- the scale: a zero (or NaN) amax becomes 448 (scale 1), the amax is clamped up to the weight dtype's
  smallest normal, then divided by 448 as torch divides by a Python number on the device (rounding.py);
- per tensor ("FP8"): torch keeps ``w / scale`` in the weight's dtype before the FP8 cast, so bf16/fp16
  round twice; on CUDA the 0-dim scale is itself first rounded to the weight dtype (an N-D weight is
  treated like its 2-D [rows, K] view, as ModelOpt treats a 2-D weight);
- per channel ("FP8_PER_CHANNEL_PER_TOKEN"): the quotient stays float32.
Steps and their rounding: docs/numerics.md, sections "FP8 per tensor" and "FP8 per channel".

The launcher, the C-loop dispatch and the torch reference are here; the Triton kernel is ``fp8_jit``, imported on
the first Triton launch (so the CPU paths never import triton).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import native
from .amax import amax_unchecked, check_amax, row_amax_unchecked
from .dequant import dequantized_sources
from .formats import DTYPE_CODES, E4M3_MAX
from .grouping import (
    Problems,
    Tiles,
    casts_scalar_divisor,
    describe,
    divides_by_reciprocal,
    engine_for,
    hardware_math,
    launch,
    num_rows,
    tiles_for,
    use_triton,
    validate,
)


class FP8Weight(NamedTuple):
    weight: torch.Tensor  # float8_e4m3fn, same shape as the input
    weight_scale: torch.Tensor  # float32: 0-dim per tensor, input.shape[:-1] per channel


def fp8_layout(shape: Sequence[int], per_channel: bool) -> FP8Weight:
    """(shape, dtype) of each output for a weight of ``shape``: the format's layout, in one place."""
    scale_shape = tuple(shape[:-1]) if per_channel else ()
    return FP8Weight((tuple(shape), torch.float8_e4m3fn), (scale_shape, torch.float32))


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

    from .fp8_jit import fp8_kernel  # triton is imported on the first launch only

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
        fp8_kernel,
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

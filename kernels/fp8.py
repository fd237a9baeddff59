"""FP8 (E4M3) weight quantization, per tensor or per output channel, one launch per dtype.

Bit-exact with ModelOpt's HF export (``get_scaling_factor`` -> ``TensorQuantizer.export_amax``):
- the scale: a zero (or NaN) amax becomes 448 (scale 1), the amax is clamped up to the weight dtype's
  smallest normal, then divided by 448 as torch divides by a Python number on the device (rounding.py);
- per tensor ("FP8"): torch keeps ``w / scale`` in the weight's dtype before the FP8 cast, so bf16/fp16
  round twice; on CUDA the 0-dim scale is itself first rounded to the weight dtype (an N-D weight is
  treated like its 2-D [rows, K] view, as ModelOpt treats a 2-D weight);
- per channel ("FP8_PER_CHANNEL_PER_TOKEN"): the quotient stays float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .amax import grouped_row_amax, report_nonfinite, resolve_amax
from .formats import E4M3_MAX
from .grouping import (
    Tiles,
    build_groups,
    count_launch,
    describe,
    entry,
    locate,
    num_rows,
    output,
    row_offsets,
    tiles_for,
    use_triton,
    validate,
)
from .rounding import (
    divide_by_constant,
    divides_by_reciprocal,
    e4m3_bits,
    e4m3_round,
    float32_reciprocal,
    round_to_dtype,
)


class FP8Weight(NamedTuple):
    weight: torch.Tensor  # float8_e4m3fn, same shape as the input
    weight_scale: torch.Tensor  # float32: 0-dim per tensor, input.shape[:-1] per channel


def fp8_layout(shape: Sequence[int], per_channel: bool) -> FP8Weight:
    """(shape, dtype) of each output for a weight of ``shape``: the format's layout, in one place."""
    scale_shape = tuple(shape[:-1]) if per_channel else ()
    return FP8Weight((tuple(shape), torch.float8_e4m3fn), (scale_shape, torch.float32))


_E4M3_MAX = tl.constexpr(E4M3_MAX)
_INV_E4M3_MAX = tl.constexpr(float32_reciprocal(E4M3_MAX))
_DTYPE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # see rounding.round_to_dtype


@triton.jit
def _export_scale(amax, TINY: tl.constexpr, RECIPROCAL: tl.constexpr):
    """ModelOpt's export scale: zero amax -> 448, clamp to the dtype's smallest normal, / 448."""
    amax = tl.where(amax == 0.0, _E4M3_MAX, tl.maximum(amax, TINY))
    return divide_by_constant(amax, _E4M3_MAX, _INV_E4M3_MAX, RECIPROCAL)


@triton.jit
def _fp8_kernel(
    table,
    amax,
    row_amax,
    nonfinite,
    ref_ptr,
    T,
    STEPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_ROW_AMAX: tl.constexpr,
    QUOTIENT_KIND: tl.constexpr,
    SCALE_KIND: tl.constexpr,
    TINY: tl.constexpr,
    RECIPROCAL: tl.constexpr,
):
    pid = tl.program_id(0)
    t = locate(table, pid, T, STEPS)
    ptr, rows, K, stride, tile_start, index, row_offset = entry(table, t)
    x_ptr = ptr.to(ref_ptr.dtype)
    q_ptr = output(table, t, 0).to(tl.pointer_type(tl.uint8))
    s_ptr = output(table, t, 1).to(tl.pointer_type(tl.float32))
    r1 = (pid - tile_start) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = r1[:, None]
    row_mask = r < rows

    if PER_CHANNEL:
        if HAS_ROW_AMAX:
            a = tl.load(row_amax + row_offset + r1, mask=r1 < rows, other=0.0)
        else:
            acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                c = k0 + tl.arange(0, BLOCK_K)[None, :]
                x = tl.load(x_ptr + r * stride + c, mask=row_mask & (c < K), other=0.0).to(tl.float32)
                acc = tl.maximum(acc, tl.abs(x))
            a = tl.max(acc, axis=1)
        scale = _export_scale(a, TINY, RECIPROCAL)
        tl.store(s_ptr + r1, scale, mask=r1 < rows)
        divisor = scale[:, None]
    else:
        scale = _export_scale(tl.load(amax + index), TINY, RECIPROCAL)
        if pid == tile_start:
            tl.store(s_ptr, scale)
        divisor = round_to_dtype(scale, SCALE_KIND)

    bad = 0
    for k0 in range(0, K, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)[None, :]
        mask = row_mask & (c < K)
        x = tl.load(x_ptr + r * stride + c, mask=mask, other=0.0).to(tl.float32)
        bad += tl.sum(tl.sum(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1), axis=0)
        q = round_to_dtype(tl.div_rn(x, divisor), QUOTIENT_KIND)
        tl.store(q_ptr + r * K + c, e4m3_bits(e4m3_round(q)), mask=mask)
    tl.atomic_max(nonfinite + index, bad)


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
    amax, row_amax = _amaxes(weights, weight_amax, per_channel, device)
    if not use_triton(device):
        if weight_amax is not None:  # otherwise the amax pass above has already checked
            report_nonfinite(weights, torch.stack([~torch.isfinite(w).all() for w in weights]))
        rows = row_amax.split([num_rows(w) for w in weights]) if row_amax is not None else None
        return [
            quantize_fp8_reference(w, rows[i] if rows is not None else amax[i], per_channel)
            for i, w in enumerate(weights)
        ]

    results = [
        FP8Weight(*(torch.empty(s, dtype=d, device=device) for s, d in fp8_layout(w.shape, per_channel)))
        for w in weights
    ]
    outs = [[r.weight for r in results], [r.weight_scale for r in results]]
    offsets = row_offsets(weights)
    nonfinite = torch.zeros(len(weights), dtype=torch.int32, device=device)
    placeholder = torch.zeros(1, dtype=torch.float32, device=device)
    tiles = tiles_for(TILES, device)
    for g in build_groups(weights, tiles.rows, outs, aux=offsets):
        if not g.num_tiles:
            continue
        kind = 0 if per_channel else _DTYPE_KIND[g.dtype]  # per channel the quotient stays float32
        _fp8_kernel[(g.num_tiles,)](
            g.table,
            amax if amax is not None else placeholder,
            row_amax if row_amax is not None else placeholder,
            nonfinite,
            weights[g.first],
            len(g.indices),
            g.search_steps,
            tiles.rows,
            tiles.cols,
            per_channel,
            row_amax is not None,
            kind,
            _scale_kind(kind, device),
            torch.finfo(g.dtype).tiny,
            divides_by_reciprocal(device),
            num_warps=tiles.warps,
        )
        count_launch("fp8")
    report_nonfinite(weights, nonfinite > 0)
    return results


def _scale_kind(quotient_kind: int, device: torch.device) -> int:
    """On CUDA torch casts the 0-dim float32 scale to the weight dtype before dividing; on CPU it
    keeps it float32.  Both measured against ModelOpt's export (benchmarks/fp8_rounding_probe.py,
    H200 run in benchmarks/RESULTS.md)."""
    return quotient_kind if device.type == "cuda" else 0


def _amaxes(
    weights: Sequence[torch.Tensor],
    weight_amax: torch.Tensor | Sequence[torch.Tensor] | None,
    per_channel: bool,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(per-tensor amax [T], flat per-row amax) with exactly one of them set where it is known."""
    if not per_channel:
        return resolve_amax(weights, weight_amax, device), None
    if weight_amax is None:
        if use_triton(device):
            return None, None  # the kernel computes row amaxes in its first pass
        return None, torch.cat(grouped_row_amax(weights))
    if len(weight_amax) != len(weights):
        raise ValueError(f"weight_amax has {len(weight_amax)} entries for {len(weights)} weights")
    flat = []
    for i, (w, a) in enumerate(zip(weights, weight_amax)):
        a = a.to(device=device, dtype=torch.float32).reshape(-1)
        if a.numel() != num_rows(w):
            raise ValueError(f"weight_amax[{i}] has {a.numel()} values for {describe(i, w)} with {num_rows(w)} rows")
        flat.append(a)
    counts = torch.tensor([len(a) for a in flat], device=device)
    owner = torch.repeat_interleave(torch.arange(len(weights), device=device), counts)
    flat = torch.cat(flat)
    invalid = owner[~(torch.isfinite(flat) & (flat >= 0))]  # one host sync for all tensors
    if len(invalid):
        i = int(invalid[0])
        raise ValueError(f"weight_amax[{i}] for {describe(i, weights[i])}: values must be finite and >= 0")
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

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

The launcher, the C-loop dispatch and the torch reference are here; the Triton kernel is ``fp8_block_jit``, imported on
the first Triton launch (so the CPU paths never import triton).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import native
from .dequant import FP8BlockSource, dequantized_sources
from .formats import E4M3_MAX, FP8_BLOCK_SIZE
from .grouping import (
    MAX_ENTRY_ELEMENTS,
    NonFiniteWeightError,
    Problems,
    Tiles,
    describe,
    divides_by_reciprocal,
    engine_for,
    hardware_math,
    launch,
    row_stride,
    tiles_for,
    use_triton,
    validate,
)


class FP8BlockWeight(NamedTuple):
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    weight_scale_inv: torch.Tensor  # float32 [ceil(N/128), ceil(K/128)]; dequantized = weight * scale per tile


def fp8_block_layout(shape: Sequence[int]) -> FP8BlockWeight:
    """(shape, dtype) of each output for a weight of ``shape``: the format's layout, in one place."""
    n, k = shape
    blocks = (math.ceil(n / FP8_BLOCK_SIZE), math.ceil(k / FP8_BLOCK_SIZE))
    return FP8BlockWeight((tuple(shape), torch.float8_e4m3fn), (blocks, torch.float32))


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

    from .fp8_block_jit import fp8_block_kernel  # triton is imported on the first launch only

    results = [
        FP8BlockWeight(*(torch.empty(s, dtype=d, device=device) for s, d in fp8_block_layout(w.shape))) for w in weights
    ]
    nonfinite = torch.zeros(len(weights), dtype=torch.int32, device=device)
    step = tiles_for(TILES, device)
    outputs = [[r.weight for r in results], [r.weight_scale_inv for r in results]]
    constexprs = {"STEP_R": step.cols, "RECIPROCAL": divides_by_reciprocal(device), "HW": hardware_math(device)}
    launch(
        "fp8_block",
        fp8_block_kernel,
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

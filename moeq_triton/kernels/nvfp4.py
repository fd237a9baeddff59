"""NVFP4 weight quantization of many weights in one launch per dtype, bit-exact with ModelOpt's export.

Per tensor: weight_scale_2 = amax / 2688.  Per block of 16: an E4M3 scale from the block amax, then
each element divided by (scale * weight_scale_2) and rounded to E2M1; two codes per byte, even
element in the low nibble.  Steps and their rounding: docs/numerics.md, section "NVFP4".

On the GPU path two launches per dtype share the tile map: one for tensors whose amax lies in a common
regime (COMMON_AMAX_MIN), where the divisions need no prescale and the sign no underflow threshold,
and the general one for the rest; each program returns at once when its tensor is the other kind.

The launcher, the C-loop dispatch and the torch reference are here; the Triton kernel is ``nvfp4_jit``, imported on
the first Triton launch (so the CPU paths never import triton).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import native
from .amax import amax_unchecked, check_amax
from .dequant import dequantized_sources
from .formats import (
    COMMON_AMAX_MAX,
    E2M1_BOUNDS,
    E2M1_MAX,
    E2M1_VALUES,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    NVFP4_BLOCK_SIZE,
    NVFP4_SCALE_2_DIVISOR,
)
from .grouping import (
    Problems,
    Tiles,
    divides_by_reciprocal,
    engine_for,
    hardware_math,
    launch,
    tiles_for,
    validate,
)


class NVFP4Weight(NamedTuple):
    weight: torch.Tensor  # uint8 [..., K/2], even element in the low nibble
    weight_scale: torch.Tensor  # float8_e4m3fn [..., K/16], linear layout
    weight_scale_2: torch.Tensor  # float32, 0-dim


TILES = {"cuda": Tiles(16, 8, 4), "cpu": Tiles(32, 16)}  # cols = 16-blocks; benchmarks/tile_sweep.py


def nvfp4_layout(shape: Sequence[int]) -> NVFP4Weight:
    """(shape, dtype) of each output for a weight of ``shape``: the format's layout, in one place."""
    lead, k = tuple(shape[:-1]), shape[-1]
    return NVFP4Weight(
        ((*lead, k // 2), torch.uint8),
        ((*lead, k // NVFP4_BLOCK_SIZE), torch.float8_e4m3fn),
        ((), torch.float32),
    )


def _empty_outputs(w: torch.Tensor) -> NVFP4Weight:
    return NVFP4Weight(*(torch.empty(s, dtype=d, device=w.device) for s, d in nvfp4_layout(w.shape)))


def nvfp4_launches(hw: bool) -> list[tuple[str, bool]]:
    """(name, COMMON) of the launches per dtype: on the GPU path the common regime and the rest (each
    program of the other kind returns at once), in the interpreter one general launch."""
    return [("nvfp4", True), ("nvfp4_fallback", False)] if hw else [("nvfp4", False)]


def quantize_nvfp4(weights: Sequence[torch.Tensor], weight_amax: torch.Tensor | None = None) -> list[NVFP4Weight]:
    """NVFP4-quantize every weight; one launch per dtype, two on the GPU path (``nvfp4_launches``), plus
    the amax pass when amax is absent.

    weight_amax: optional float32 [len(weights)], e.g. reduced across ranks or shared by a scale group.
    """
    device = validate(weights, block=NVFP4_BLOCK_SIZE)
    if device is None:
        return []
    engine = engine_for(device, native.enabled())
    problems = Problems(weights)
    if weight_amax is None:
        amax = amax_unchecked(weights, device, problems)
    else:
        amax = check_amax(weights, weight_amax, device, problems)
    if engine == "native":
        problems.raise_first()
        results = [_empty_outputs(w) for w in weights]
        # one fused C pass per weight, a thread per core; FP8-block sources are read fused
        bad = native.nvfp4(weights, amax, results)
        problems.add_nonfinite(torch.tensor([i in bad for i in range(len(weights))], dtype=torch.bool))
    elif engine == "reference":
        if weight_amax is not None:  # otherwise the amax pass has checked
            problems.add_nonfinite(torch.stack([~torch.isfinite(w).all() for w in dequantized_sources(weights)]))
        problems.raise_first()
        results = []
        for w, a in zip(dequantized_sources(weights), amax):
            blocks = w.float().unflatten(-1, (-1, NVFP4_BLOCK_SIZE))
            # (one tensor at a time on purpose: batching same-shape experts measured 1.5x slower on CPU,
            # the per-expert temporaries stay in cache)
            results.append(_nvfp4_from_blocks(blocks, blocks.abs().amax(-1), a))
    else:
        from .nvfp4_jit import nvfp4_kernel  # triton is imported on the first launch only

        results = [_empty_outputs(w) for w in weights]
        nonfinite = torch.zeros(len(weights), dtype=torch.int32, device=device)
        redo = torch.zeros(len(weights), dtype=torch.int32, device=device)  # common launch -> general one
        tiles = tiles_for(TILES, device)
        hw = hardware_math(device)
        # the GPU path: the common-regime launch, then the exact general one over the rest (no host read)
        for name, common in nvfp4_launches(hw):
            launch(
                name,
                nvfp4_kernel,
                weights,
                tiles,
                args=(amax, nonfinite, redo),
                outputs=[[getattr(r, field) for r in results] for field in NVFP4Weight._fields],
                BLOCKS=tiles.cols,
                RECIPROCAL=divides_by_reciprocal(device),
                HW=hw,
                COMMON=common,
                per_dtype=lambda dtype: {"BF16": dtype == torch.bfloat16, "AMAX_MAX": COMMON_AMAX_MAX[dtype]},
            )
        problems.add_nonfinite(nonfinite > 0)
    problems.raise_first()
    return results


# ----------------------------------------------------------------------------------------------
# Reference: plain torch, one tensor at a time, written from the numerics (not from the kernel).


def e2m1_codes_reference(x: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes of float32 x: ties to even, sign in bit 3 (x < 0), NaN -> 7 (as searchsorted puts it).

    Midpoint i is crossed with ``>`` for even i and ``>=`` for odd i: a tie lands on the even code.
    (Seven byte-wide comparisons measured 3x faster than one torch.bucketize on CPU.)
    """
    m = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for i, bound in enumerate(E2M1_BOUNDS):
        code += (m >= bound) if i % 2 else (m > bound)
    code = torch.where(torch.isnan(m), 7, code)
    return code | ((x < 0).to(torch.uint8) << 3)


def quantize_nvfp4_reference(w: torch.Tensor, amax: torch.Tensor) -> NVFP4Weight:
    blocks = w.float().unflatten(-1, (-1, NVFP4_BLOCK_SIZE))
    return _nvfp4_from_blocks(blocks, blocks.abs().amax(-1), amax)


def _nvfp4_from_blocks(blocks: torch.Tensor, block_amax: torch.Tensor, amax: torch.Tensor) -> NVFP4Weight:
    scale_2 = amax.float().reshape(()) / NVFP4_SCALE_2_DIVISOR
    scale = block_amax / (E2M1_MAX * scale_2)
    scale = torch.where(scale == 0, 1.0, scale)
    scale = scale.clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX).to(torch.float8_e4m3fn)
    x = blocks / (scale.float() * scale_2).unsqueeze(-1)
    code = e2m1_codes_reference(x).flatten(-2)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return NVFP4Weight(packed, scale, scale_2)


def dequantize_nvfp4_reference(q: NVFP4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse map used by tests and verification: E2M1 value * block scale * weight_scale_2."""
    signed = [*E2M1_VALUES, *(-v for v in E2M1_VALUES)]
    values = torch.tensor(signed, dtype=torch.float32, device=q.weight.device)
    codes = torch.stack([q.weight & 0xF, q.weight >> 4], dim=-1).flatten(-2).long()
    x = values[codes].unflatten(-1, (-1, NVFP4_BLOCK_SIZE))
    scale = q.weight_scale.float() * q.weight_scale_2
    return (x * scale.unsqueeze(-1)).flatten(-2).to(dtype)

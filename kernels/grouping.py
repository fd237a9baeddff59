"""Grouped launches: one device table of pointers, shapes and strides for a list of weights.

Every kernel in this package walks all row tiles of all tensors of one dtype in a single grid.
The table replaces a stacking copy: tensors stay where they are (separate parameters, views of a
stacked (E, N, K) parameter, TP shards with a row stride), and each program finds its tensor by a
binary search over the tile offsets.  This module also validates inputs (errors name the tensor),
chooses between the Triton kernels and the torch references, and counts launches.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .formats import WEIGHT_DTYPES

# Columns of the int64 table shared by all kernels (constexpr so that jit code can read them).
COL_PTR = tl.constexpr(0)  # data_ptr of the input tensor
COL_ROWS = tl.constexpr(1)  # product of all dims but the last
COL_K = tl.constexpr(2)  # last dim
COL_ROW_STRIDE = tl.constexpr(3)  # elements between consecutive rows
COL_TILE_START = tl.constexpr(4)  # first program id of this tensor (prefix sum of row tiles)
COL_INDEX = tl.constexpr(5)  # position of the tensor in the caller's list
COL_AUX = tl.constexpr(6)  # kernel-specific integer (FP8 per channel: offset of this tensor's rows in a flat buffer)
COL_OUT0 = tl.constexpr(7)  # first output pointer; kernels define how many they use
NUM_OUT_COLS = tl.constexpr(3)
TABLE_COLS = tl.constexpr(COL_OUT0.value + NUM_OUT_COLS.value)

_LAUNCHES: Counter[str] = Counter()


class Tiles(NamedTuple):
    """Work of one program: rows x columns (NVFP4: 16-element blocks) and, on a GPU, warps."""

    rows: int
    cols: int
    warps: int = 4


def tiles_for(table: dict[str, Tiles], device: torch.device) -> Tiles:
    """A kernel's tile choice for the device: 'cuda' (occupancy) or 'cpu' (the interpreter: few programs)."""
    return table["cuda" if device.type == "cuda" else "cpu"]


def launch_counts() -> dict[str, int]:
    """Triton launches per kernel name since the last reset (tests read this)."""
    return dict(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()


def count_launch(name: str) -> None:
    _LAUNCHES[name] += 1


def use_triton(device: torch.device) -> bool:
    """Triton on CUDA; on CPU only under the interpreter (TRITON_INTERPRET=1), else the reference."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def describe(index: int, w: torch.Tensor) -> str:
    """How errors name a tensor: its position in the list, shape and dtype."""
    return f"weights[{index}] (shape {tuple(w.shape)}, {w.dtype})"


def num_rows(w: torch.Tensor) -> int:
    """Rows of a weight: the product of all dims but the last (the quantized axis)."""
    return w.numel() // w.shape[-1] if w.shape[-1] else 0


def row_offsets(weights: Sequence[torch.Tensor]) -> list[int]:
    """Start of each weight's rows in a flat per-row buffer (per-channel amaxes and scales)."""
    return [0, *itertools.accumulate(num_rows(w) for w in weights)][:-1]


def row_stride(index: int, w: torch.Tensor) -> int:
    """Elements between rows when all leading dims collapse into one row axis, else an error."""
    if w.dim() == 0:
        raise ValueError(f"{describe(index, w)}: a 0-dim tensor has no axis to quantize")
    if w.shape[-1] > 1 and w.stride(-1) != 1:
        raise ValueError(
            f"{describe(index, w)}: the last dim must have stride 1 (got strides {w.stride()}); "
            "pass .contiguous() or a view whose rows are contiguous"
        )
    if w.dim() == 1:
        return w.shape[0]
    # Leading dims collapse when each stride equals the next stride times the next size.
    for i in range(w.dim() - 2):
        if w.shape[i] > 1 and w.stride(i) != w.stride(i + 1) * w.shape[i + 1]:
            raise ValueError(
                f"{describe(index, w)}: leading dims do not collapse into rows (strides {w.stride()}); "
                "pass a view with one row stride, e.g. one expert of a stacked parameter"
            )
    return w.stride(-2)


def validate(weights: Sequence[torch.Tensor], block: int = 1) -> torch.device | None:
    """Check every weight; return their common device (None for an empty list)."""
    if isinstance(weights, torch.Tensor):
        raise TypeError("weights must be a sequence of tensors; wrap a single tensor in a list")
    device = None
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{i}] is a {type(w).__name__}, not a torch.Tensor")
        if w.dtype not in WEIGHT_DTYPES:
            raise TypeError(f"{describe(i, w)}: unsupported dtype; expected bfloat16, float16 or float32")
        row_stride(i, w)
        if block > 1 and w.shape[-1] % block:
            raise ValueError(
                f"{describe(i, w)}: last dim {w.shape[-1]} is not a multiple of the block size {block}; "
                "ModelOpt's NVFP4 export asserts the same (it pads only inside NVFP4QTensor.quantize)"
            )
        if device is None:
            device = w.device
        elif w.device != device:
            raise ValueError(f"{describe(i, w)} is on {w.device}, but weights[0] is on {device}")
    return device


@dataclass
class Group:
    """All tensors of one dtype: their table on the device and the grid size."""

    dtype: torch.dtype
    indices: list[int]
    table: torch.Tensor  # int64 [len(indices), TABLE_COLS]
    num_tiles: int

    @property
    def search_steps(self) -> int:
        """Iterations of the in-kernel binary search over tile offsets."""
        return max(1, math.ceil(math.log2(len(self.indices) + 1)))

    @property
    def first(self) -> int:
        return self.indices[0]


def build_groups(
    weights: Sequence[torch.Tensor],
    block_rows: int,
    outputs: Sequence[Sequence[torch.Tensor | None]] = (),
    aux: Sequence[int] | None = None,
) -> list[Group]:
    """One table per dtype.  ``outputs[j][i]`` is the j-th output tensor of weight i (or None)."""
    device = weights[0].device
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, w in enumerate(weights):
        by_dtype.setdefault(w.dtype, []).append(i)
    groups = []
    for dtype, indices in by_dtype.items():
        rows_table = []
        tile = 0
        for i in indices:
            w = weights[i]
            rows = num_rows(w)
            outs = [o[i].data_ptr() if o[i] is not None else 0 for o in outputs]
            outs += [0] * (NUM_OUT_COLS.value - len(outs))
            rows_table.append([w.data_ptr(), rows, w.shape[-1], row_stride(i, w), tile, i, aux[i] if aux else 0, *outs])
            tile += math.ceil(rows / block_rows)
        table = torch.tensor(rows_table, dtype=torch.int64).to(device)
        groups.append(Group(dtype, indices, table, tile))
    return groups


@triton.jit
def locate(table, pid, T, STEPS: tl.constexpr):
    """Row of ``table`` whose tiles contain program ``pid``: the last entry with tile_start <= pid."""
    t = pid * 0
    for i in tl.static_range(STEPS):
        cand = t + (1 << (STEPS - 1 - i))
        start = tl.load(table + tl.minimum(cand, T - 1) * TABLE_COLS + COL_TILE_START)
        t = tl.where((cand < T) & (start <= pid), cand, t)
    return t


@triton.jit
def entry(table, t):
    """Fields of table row ``t``: (ptr, rows, K, row_stride, tile_start, index, aux)."""
    row = table + t * TABLE_COLS
    return (
        tl.load(row + COL_PTR),
        tl.load(row + COL_ROWS),
        tl.load(row + COL_K),
        tl.load(row + COL_ROW_STRIDE),
        tl.load(row + COL_TILE_START),
        tl.load(row + COL_INDEX),
        tl.load(row + COL_AUX),
    )


@triton.jit
def output(table, t, j: tl.constexpr):
    """The j-th output pointer of table row ``t`` (an int64; cast it with ``.to(pointer type)``)."""
    return tl.load(table + t * TABLE_COLS + COL_OUT0 + j)

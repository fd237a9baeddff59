"""The jit side of ``grouping``: how a kernel finds its tile, its weight and its outputs in the tables.

Imported only by the kernel modules' jit halves (``*_jit.py``), which the launchers import on their first
Triton launch, so that the CPU paths never import triton."""

from __future__ import annotations

import triton
import triton.language as tl

from . import grouping

# The table's columns (grouping.COL_*) as constexprs, the form jit code can read.
COL_PTR = tl.constexpr(grouping.COL_PTR)
COL_ROWS = tl.constexpr(grouping.COL_ROWS)
COL_K = tl.constexpr(grouping.COL_K)
COL_ROW_STRIDE = tl.constexpr(grouping.COL_ROW_STRIDE)
COL_SCALE_PTR = tl.constexpr(grouping.COL_SCALE_PTR)
COL_SCALE_STRIDE = tl.constexpr(grouping.COL_SCALE_STRIDE)
TABLE_COLS = tl.constexpr(grouping.TABLE_COLS)
MAX_OUTPUTS = tl.constexpr(grouping.MAX_OUTPUTS)


@triton.jit
def tile_entry(tile_map):
    """(table entry, tile within the entry, tensor index, flat row of the entry's first row) of this
    program, from the host-built map: per-tensor and per-row values (amaxes) are then one load away,
    like the table row."""
    row = tile_map + 4 * tl.program_id(0)
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def weight_rows(table, t, x_ref, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """(pointer, rows, K, row stride) of entry ``t``; int32 sizes, alignment facts when ALIGNED (stated
    on values cast from the table, where the compiler keeps them)."""
    row = table + t * TABLE_COLS
    x_ptr = tl.load(row + COL_PTR).to(x_ref.dtype)
    rows = tl.load(row + COL_ROWS).to(tl.int32)
    K = tl.load(row + COL_K).to(tl.int32)
    stride = tl.load(row + COL_ROW_STRIDE).to(tl.int32)
    if ALIGNED:
        x_ptr = tl.multiple_of(x_ptr, 16)
        K = tl.multiple_of(K, VEC)
        stride = tl.multiple_of(stride, VEC)
    return x_ptr, rows, K, stride


@triton.jit
def output_ptr(out_table, t, j: tl.constexpr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """The j-th output pointer of entry ``t`` as a pointer to ``dtype`` (16-byte aligned when ALIGNED)."""
    p = tl.load(out_table + t * MAX_OUTPUTS + j).to(tl.pointer_type(dtype))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def source_scales(table, t, BLOCK_R: tl.constexpr):
    """(float32 pointer to the scale row of entry ``t``'s first row, scale row stride) of an FP8-block
    source: tile ``i`` of BLOCK_R rows (BLOCK_R divides 128 or is a multiple of it) reads scale row
    ``i * BLOCK_R // 128``.  Loaded beside the other table columns: no longer chain of loads."""
    row = table + t * TABLE_COLS
    ptr = tl.load(row + COL_SCALE_PTR).to(tl.pointer_type(tl.float32))
    return ptr, tl.load(row + COL_SCALE_STRIDE).to(tl.int32)

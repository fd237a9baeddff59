"""Grouped launches: validate a list of weights once, choose the engine once, and launch one grid per dtype.

Every kernel of this package walks all row tiles of all tensors of one dtype in a single grid, through
a device table of pointers, shapes and strides (no stacking copy) and a host-built int32 tile map
(tile -> table entry), so a program reaches its first weight byte after two dependent loads.  The table
is cached per list of tensors; nothing here synchronizes with the device; the one read of the
problems found (non-finite weights, bad amaxes) happens in ``Problems.raise_first``, once per call.

A new kernel adopts ``launch``: its first parameters are ``(table, tile_map, out_table, x_ref)``, it
finds its tile with ``tile_entry`` and its weight with ``weight_rows``, and its per-call outputs are
read with ``output_ptr`` (those jit helpers are ``grouping_jit``: this module imports no triton, so that the
CPU paths never do; a launcher imports its kernel's ``*_jit`` module on its first Triton launch).

An FP8-block source (``dequant.FP8BlockSource``: e4m3 codes plus one float32 scale per 128x128 block) is
a kind of input of its own: its tensors form a group (one launch) whose table rows hold the codes'
pointer, shape and row stride as a tensor's do, plus the scale pointer and the scale row stride
(``grouping_jit.source_scales``); the kernel is launched with SOURCE=True and ``per_dtype`` is asked for bfloat16,
the dtype of the values the codes stand for.
"""

from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .dequant import FP8BlockSource
from .formats import DTYPE_CODES, FP8_BLOCK_SIZE

# Columns of the int64 table (grouping_jit holds them as constexprs for the jit code).
COL_PTR = 0  # data_ptr of this entry's first row
COL_ROWS = 1  # rows of this entry (a tensor, or a chunk of one: see MAX_ENTRY_ELEMENTS)
COL_K = 2  # last dim
COL_ROW_STRIDE = 3  # elements between consecutive rows
COL_INDEX = 4  # position of the tensor in the caller's list
COL_FLAT_ROW = 5  # this entry's first row in a flat per-row buffer of all tensors
COL_SCALE_PTR = 6  # FP8-block sources: data_ptr of the scale row of this entry's first row
COL_SCALE_STRIDE = 7  # FP8-block sources: float32 elements between scale rows (0 for a tensor)
TABLE_COLS = 8
MAX_OUTPUTS = 3  # columns of the per-call output table

MAX_ENTRY_ELEMENTS = 2**31 - 1
"""Offsets inside an entry are int32: a tensor whose rows span more elements is split into row chunks."""

ENGINES = ("triton", "native", "reference")

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


def use_triton(device: torch.device) -> bool:
    """Triton on CUDA; on CPU only under the interpreter (TRITON_INTERPRET=1), else the reference."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def hardware_math(device: torch.device) -> bool:
    """Kernels use the GPU's FMA and conversion instructions on CUDA; the interpreter gets the portable
    formulation (its fma rounds twice and its float8 cast is wrong: docs/numerics.md, "The Triton
    interpreter's float8 cast")."""
    return device.type == "cuda"


def divides_by_reciprocal(device: torch.device) -> bool:
    """Does torch compute ``float32_tensor / python_number`` as ``x * float32(1 / number)`` on this device?

    On CUDA yes: ATen's div_true_kernel_cuda multiplies by the reciprocal of a CPU scalar (measured on an
    H200, benchmarks/RESULTS.md); on CPU a float32 tensor is divided exactly.  ModelOpt computes its
    export scales this way (``amax.float() / 448.0``, ``amax.float() / (6.0 * 448.0)``), so the two
    devices can differ by one ulp and each kernel follows the device it runs on.
    """
    return device.type == "cuda"


def casts_scalar_divisor(device: torch.device) -> bool:
    """Does torch cast a 0-dim float32 divisor to the dividend's dtype (``bf16_tensor / scale``)?

    On CUDA yes (the 0-dim tensor becomes a CPU-scalar-like operand of the weight's dtype); on CPU the
    division promotes to float32.  Both measured against ModelOpt's export (tools/fp8_rounding_probe.py,
    H200 run in benchmarks/RESULTS.md).
    """
    return device.type == "cuda"


Weight = torch.Tensor | FP8BlockSource
"""What the kernels accept in a list of weights: a tensor, or an FP8-block source standing for bf16 values."""

SOURCE_VALUE_DTYPE = torch.bfloat16
"""The dtype of the values an FP8-block source stands for (what ``per_dtype`` is asked for)."""


def is_source(w: Weight) -> bool:
    return isinstance(w, FP8BlockSource)


def storage(w: Weight) -> torch.Tensor:
    """The tensor a kernel reads element by element: the codes of a source, else the weight itself."""
    return w.codes if isinstance(w, FP8BlockSource) else w


def value_dtype(w: Weight) -> torch.dtype:
    """The dtype of the values a kernel computes on (bfloat16 for a source)."""
    return SOURCE_VALUE_DTYPE if isinstance(w, FP8BlockSource) else w.dtype


def describe(index: int, w: Weight) -> str:
    """How errors name a tensor: its position in the list, shape and dtype."""
    if isinstance(w, FP8BlockSource):
        return f"weights[{index}] (FP8-block source, shape {tuple(w.shape)}, {w.codes.dtype})"
    return f"weights[{index}] (shape {tuple(w.shape)}, {w.dtype})"


def num_rows(w: Weight) -> int:
    """Rows of a weight: the product of all dims but the last (the quantized axis)."""
    return math.prod(w.shape[:-1]) if w.shape[-1] else 0


def row_offsets(weights: Sequence[torch.Tensor]) -> list[int]:
    """Start of each weight's rows in a flat per-row buffer (per-channel amaxes and scales)."""
    out, total = [], 0
    for w in weights:
        out.append(total)
        total += num_rows(w)
    return out


def row_stride(index: int, w: Weight) -> int:
    """Elements between rows when all leading dims collapse into one row axis, else an error."""
    if isinstance(w, FP8BlockSource):
        _check_source(index, w)
        return w.codes.stride(0)
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


def _check_source(index: int, w: FP8BlockSource) -> None:
    """An FP8-block source the kernels can read: 2-D e4m3 codes with contiguous rows and a float scale
    tensor of ceil(N/128) x ceil(K/128) with contiguous rows, both on one device."""
    codes, scale = w.codes, w.scale_inv
    if not isinstance(codes, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise TypeError(f"weights[{index}]: an FP8BlockSource holds two tensors (codes, scale_inv)")
    where = describe(index, w)
    if codes.dtype != torch.float8_e4m3fn or codes.dim() != 2:
        raise ValueError(f"{where}: the codes must be a 2-D float8_e4m3fn tensor")
    if codes.shape[1] > 1 and codes.stride(1) != 1:
        raise ValueError(f"{where}: the codes' last dim must have stride 1 (got strides {codes.stride()})")
    expected = tuple(-(-n // FP8_BLOCK_SIZE) for n in codes.shape)
    if tuple(scale.shape) != expected or not scale.is_floating_point():
        raise ValueError(
            f"{where}: its scale_inv has shape {tuple(scale.shape)} ({scale.dtype}); expected a float tensor of "
            f"shape {expected} for {FP8_BLOCK_SIZE}x{FP8_BLOCK_SIZE} blocks"
        )
    if scale.device != codes.device:
        raise ValueError(f"{where}: scale_inv is on {scale.device}, the codes on {codes.device}")


def validate(weights: Sequence[Weight], block: int = 1) -> torch.device | None:
    """Check every weight; return their common device (None for an empty list)."""
    if isinstance(weights, torch.Tensor | FP8BlockSource):
        raise TypeError("weights must be a sequence of tensors; wrap a single tensor in a list")
    device = None
    for i, w in enumerate(weights):
        if isinstance(w, FP8BlockSource):
            row_stride(i, w)  # checks the source
        elif not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{i}] is a {type(w).__name__}, not a torch.Tensor or an FP8BlockSource")
        elif w.dtype not in DTYPE_CODES:
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


def engine_for(device: torch.device, native_available: bool) -> str:
    """The one decision of a public function: 'triton' (CUDA, or the interpreter), the compiled C loop
    ('native', CPU) or the torch reference."""
    if use_triton(device):
        return "triton"
    return "native" if native_available else "reference"


# ---------------------------------------------------------------------------------------------- problems


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or Inf; ``index`` is its position in the caller's list."""

    def __init__(self, index: int, description: str) -> None:
        super().__init__(f"{description} contains NaN or Inf; refusing to quantize it")
        self.index = index


class Problems:
    """Device-side findings of one call, read by the host once at the end (one synchronization).

    Each finding is a bool vector over the weights plus a message builder; the first finding added
    wins, as if each had been checked (and raised) in order.
    """

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        self.weights = weights
        self.checks: list[tuple[torch.Tensor, object]] = []

    def add(self, bad: torch.Tensor, message) -> None:
        """``bad``: bool [len(weights)] on the device; ``message(i)`` -> the exception for weight i."""
        self.checks.append((bad.reshape(-1), message))

    def add_nonfinite(self, bad: torch.Tensor) -> None:
        self.add(bad, lambda i: NonFiniteWeightError(i, describe(i, self.weights[i])))

    def raise_first(self) -> None:
        if not self.checks:
            return
        n = len(self.weights)
        where = torch.arange(n, device=self.checks[0][0].device)
        firsts = torch.stack([torch.where(bad, where, n).amin() if n else where.sum() for bad, _ in self.checks])
        for value, (_, message) in zip(firsts.tolist(), self.checks):  # the one read of the call
            if value < n:
                raise message(value)


# ---------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True, kw_only=True)
class Group:
    """All tensors of one dtype (or all FP8-block sources) as the kernels see them: a table on the device
    and the grid."""

    dtype: torch.dtype  # the values' dtype (bfloat16 for sources)
    indices: tuple[int, ...]  # positions in the caller's list
    entries: tuple[tuple[int, int, int], ...]  # (index, first row, rows) per table entry
    table: torch.Tensor  # int64 [entries, TABLE_COLS]
    tile_map: torch.Tensor  # int32 [tiles, 4]: (entry, tile within the entry, tensor index, flat first row)
    num_tiles: int
    aligned: bool  # every entry: base 16-byte aligned, K and row stride multiples of 16 bytes
    vec: int  # elements per 16 bytes
    source: bool = False  # FP8-block sources: the entries read codes and block scales
    keep: tuple[torch.Tensor, ...] = ()  # float32 copies of scale tensors given in another dtype


_CACHE: OrderedDict[tuple, list[Group]] = OrderedDict()
_CACHE_SIZE = 16
_STATS = Counter()


def table_cache_stats() -> dict[str, int]:
    """Hits and misses of the table cache since start (tests read this)."""
    return dict(_STATS)


def clear_table_cache() -> None:
    """Forget every cached table (tests that change MAX_ENTRY_ELEMENTS call this)."""
    _CACHE.clear()


def _to_device(rows: list[list[int]], dtype: torch.dtype, cols: int, device: torch.device) -> torch.Tensor:
    """A host-built table copied without a synchronization (pinned memory, non_blocking) on CUDA."""
    host = torch.tensor(rows, dtype=dtype) if rows else torch.zeros((0, cols), dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _entries(index: int, w: Weight, block_rows: int) -> list[tuple[int, int, int]]:
    """(index, first row, rows) chunks so that int32 offsets never overflow inside a chunk."""
    rows, stride, k = num_rows(w), row_stride(index, w), w.shape[-1]
    if rows == 0 or k == 0:
        return []
    span = (rows - 1) * stride + k
    if span <= MAX_ENTRY_ELEMENTS:
        return [(index, 0, rows)]
    chunk = (MAX_ENTRY_ELEMENTS - k) // max(stride, 1) + 1
    least, unit = block_rows, 64 * block_rows  # keeps output alignment
    if isinstance(w, FP8BlockSource):  # and a source's chunks start on a scale row
        least, unit = math.lcm(least, FP8_BLOCK_SIZE), math.lcm(unit, FP8_BLOCK_SIZE)
    chunk = max(least, chunk // unit * unit)
    return [(index, r0, min(chunk, rows - r0)) for r0 in range(0, rows, chunk)]


def _geometry(w: Weight) -> tuple:
    if isinstance(w, FP8BlockSource):
        s = w.scale_inv
        return (*_geometry(w.codes), s.data_ptr(), s.shape, s.stride(), s.dtype)
    return (w.data_ptr(), w.shape, w.stride(), w.dtype, w.device)


def groups_for(weights: Sequence[Weight], block_rows: int) -> list[Group]:
    """The tables of a list of weights (one group per dtype, one for FP8-block sources), built once and
    cached by geometry."""
    key = (block_rows, tuple(_geometry(w) for w in weights))
    cached = _CACHE.get(key)
    if cached is not None:
        _STATS["hit"] += 1
        _CACHE.move_to_end(key)
        return cached
    _STATS["miss"] += 1
    groups = _build(weights, block_rows)
    _CACHE[key] = groups
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return groups


def _build(weights: Sequence[Weight], block_rows: int) -> list[Group]:
    device = weights[0].device
    flat = row_offsets(weights)
    by_kind: dict[torch.dtype | str, list[int]] = {}
    for i, w in enumerate(weights):
        by_kind.setdefault("fp8_block_source" if isinstance(w, FP8BlockSource) else w.dtype, []).append(i)
    groups = []
    for kind, indices in by_kind.items():
        source = kind == "fp8_block_source"
        size = storage(weights[indices[0]]).element_size()
        vec = 16 // size
        entries, table, tile_map, keep = [], [], [], []
        aligned = True
        for i in indices:
            w = weights[i]
            stride = row_stride(i, w)
            scale_ptr = scale_stride = 0
            if source:
                scale = w.scale_inv
                if scale.dtype != torch.float32 or (scale.shape[1] > 1 and scale.stride(1) != 1):
                    scale = scale.float().contiguous()  # a few KB; DeepSeek's are float32 already
                    keep.append(scale)
                scale_ptr, scale_stride = scale.data_ptr(), scale.stride(0)
            for index, r0, rows in _entries(i, w, block_rows):
                ptr = storage(w).data_ptr() + r0 * stride * size
                aligned &= ptr % 16 == 0 and w.shape[-1] % vec == 0 and (stride % vec == 0 or rows == 1)
                e = len(entries)
                entries.append((index, r0, rows))
                row = [ptr, rows, w.shape[-1], stride, index, flat[index] + r0, 0, 0]
                if source:  # chunks start on a multiple of 128 rows (_entries)
                    row[COL_SCALE_PTR] = scale_ptr + r0 // FP8_BLOCK_SIZE * scale_stride * 4
                    row[COL_SCALE_STRIDE] = scale_stride
                table.append(row)
                first = flat[index] + r0
                tile_map.extend([e, t, index, first] for t in range(math.ceil(rows / block_rows)))
        groups.append(
            Group(
                dtype=SOURCE_VALUE_DTYPE if source else kind,
                indices=tuple(indices),
                entries=tuple(entries),
                table=_to_device(table, torch.int64, TABLE_COLS, device),
                tile_map=_to_device(tile_map, torch.int32, 4, device),
                num_tiles=len(tile_map),
                aligned=aligned,
                vec=vec,
                source=source,
                keep=tuple(keep),
            )
        )
    return groups


def output_table(group: Group, outputs: Sequence[Sequence[torch.Tensor]], weights: Sequence[Weight]):
    """int64 [entries, MAX_OUTPUTS]: each entry's output pointers (a chunk's offset by its first row).

    An output of weight i holds ``numel // rows`` elements per row of the weight (0 for a 0-dim scale).
    """
    pad = [0] * (MAX_OUTPUTS - len(outputs))
    rows = []
    for index, r0, _ in group.entries:
        if r0 == 0:  # the common case: no row offset
            rows.append([out[index].data_ptr() for out in outputs] + pad)
            continue
        ptrs = []
        for out in outputs:
            o = out[index]
            per_row = o.numel() // num_rows(weights[index])
            ptrs.append(o.data_ptr() + r0 * per_row * o.element_size())
        rows.append(ptrs + pad)
    return _to_device(rows, torch.int64, MAX_OUTPUTS, group.table.device)


def launch(
    name: str,
    kernel,
    weights: Sequence[Weight],
    tiles: Tiles,
    *,
    args: Sequence = (),
    outputs: Sequence[Sequence[torch.Tensor]] = (),
    per_dtype=None,
    **constexprs,
) -> None:
    """One launch per dtype (and one for FP8-block sources) of
    ``kernel[(tiles,)](table, tile_map, out_table, x_ref, *args, ...)``.

    ``outputs[j][i]``: the j-th output tensor of weight i.  ``per_dtype(dtype)`` may add constexprs
    that depend on the group's dtype (bfloat16 for sources).  Constexprs ALIGNED, VEC, BLOCK_R and
    SOURCE are always passed.
    """
    for g in groups_for(weights, tiles.rows):
        if not g.num_tiles:
            continue
        extra = per_dtype(g.dtype) if per_dtype else {}
        kernel[(g.num_tiles,)](
            g.table,
            g.tile_map,
            output_table(g, outputs, weights) if outputs else g.table,
            storage(weights[g.indices[0]]),
            *args,
            ALIGNED=g.aligned,
            VEC=g.vec,
            BLOCK_R=tiles.rows,
            SOURCE=g.source,
            **constexprs,
            **extra,
            num_warps=tiles.warps,
        )
        _LAUNCHES[name] += 1

"""The CPU fast path: nvfp4_cpu.c compiled once with the system C compiler, called through ctypes.

Without a GPU the kernels would fall back to their torch references, which make many passes over
float32 temporaries per weight.  The C loop does amax, NVFP4, FP8 (per tensor, per channel) and
FP8-block in one pass per weight with the same float32 operations (no fast-math, no contraction), and
reads FP8-block sources (``FP8BlockSource``) directly: each value is bf16(code x its block's scale),
as the dequantization gives, from a per-strip table (no bf16 copy).  ctypes releases the GIL, so a
thread per core quantizes weights side by side.  The library is built on first use into the cache directory
($MOEQ_TRITON_CACHE or ~/.cache/moeq-triton, keyed by the source's hash) in about a second; without
a compiler, or with MOEQ_TRITON_NATIVE=0, the references run instead (same bytes, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

from .dequant import FP8BlockSource
from .formats import (
    DTYPE_CODES,
    E2M1_BOUNDS,
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    FP8_BLOCK_SIZE,
    NVFP4_BLOCK_SIZE,
    NVFP4_SCALE_2_DIVISOR,
)
from .grouping import Weight, num_rows, row_stride

SOURCE = Path(__file__).with_name("nvfp4_cpu.c")
# -march=native vectorizes the loops (2x here); the build is then tied to this CPU, so the cache key
# holds the CPU's feature flags.  Exactness needs no fast-math and no fused multiply-add contraction.
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]


def _float(value: float) -> str:
    return f"{float(value).hex()}f"  # exact in C, for any float32 value


# The format constants, from formats.py only (the C source names them, never spells them).
_DEFINES = [
    f"-DE2M1_BOUNDS_INIT={{{','.join(_float(b) for b in E2M1_BOUNDS)}}}",
    f"-DE2M1_MAX={_float(E2M1_MAX)}",
    f"-DE4M3_MAX={_float(E4M3_MAX)}",
    f"-DE4M3_MIN_SUBNORMAL={_float(E4M3_MIN_SUBNORMAL)}",
    f"-DNVFP4_SCALE_2_DIVISOR={_float(NVFP4_SCALE_2_DIVISOR)}",
    f"-DBLOCK={NVFP4_BLOCK_SIZE}",
    f"-DFP8_BLOCK={FP8_BLOCK_SIZE}",
]

SOURCE_FP8_BLOCK = 3
"""The C loop's dtype code of an FP8-block source (after DTYPE_CODES' 0-2)."""


def _cpu_signature() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as info:
            return next((line for line in info if line.startswith(b"flags")), b"")
    except OSError:
        import platform

        return platform.machine().encode()


def enabled() -> bool:
    return os.environ.get("MOEQ_TRITON_NATIVE", "1") != "0" and library() is not None


def cache_dir() -> Path:
    """This project's cache ($MOEQ_TRITON_CACHE or ~/.cache/moeq-triton), shared with the integration layer."""
    return Path(os.environ.get("MOEQ_TRITON_CACHE", Path.home() / ".cache" / "moeq-triton"))


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled library (built once per source version), or None when it cannot be built."""
    code = SOURCE.read_bytes()
    cache = cache_dir() / "native"
    key = hashlib.sha256(code + " ".join(_FLAGS + _DEFINES).encode() + _cpu_signature()).hexdigest()[:16]
    target = cache / f"nvfp4_cpu-{key}.so"
    if not target.is_file():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            return None
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / target.name
                command = [compiler, *_FLAGS, *_DEFINES, "-o", str(built), str(SOURCE), "-lm"]
                subprocess.run(command, check=True, capture_output=True)
                os.replace(built, target)  # atomic: concurrent processes never load a half-written file
        except (OSError, subprocess.CalledProcessError):
            return None
    lib = ctypes.CDLL(str(target))
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    source = [ptr, ctypes.c_int, i64, i64, i64, ptr]  # weight, dtype code, rows, K, row stride, scale_inv
    lib.moeq_amax.argtypes = source
    lib.moeq_amax.restype = f32
    lib.moeq_nvfp4.argtypes = [*source, f32, ptr, ptr, ptr]
    lib.moeq_nvfp4.restype = ctypes.c_int
    lib.moeq_fp8.argtypes = [*source, ptr, ctypes.c_int, f32, ptr, ptr]
    lib.moeq_fp8.restype = ctypes.c_int
    lib.moeq_fp8_block.argtypes = [*source, f32, ptr, ptr]
    lib.moeq_fp8_block.restype = ctypes.c_int
    return lib


class _Source:
    """The C loop's view of one weight: its arguments, and the tensors they point into (kept alive)."""

    def __init__(self, index: int, w: Weight) -> None:
        if isinstance(w, FP8BlockSource):
            self.scale_inv = w.scale_inv.to(torch.float32).contiguous()
            codes = w.codes
            self.args = (codes.data_ptr(), SOURCE_FP8_BLOCK, codes.shape[0], codes.shape[1], codes.stride(0))
            self.args += (self.scale_inv.data_ptr(),)
            self.dtype = torch.bfloat16  # the dequantized values are bf16
        else:
            self.args = (w.data_ptr(), DTYPE_CODES[w.dtype], num_rows(w), w.shape[-1], row_stride(index, w), None)
            self.dtype = w.dtype
        self.empty = w.shape[-1] == 0 or self.args[2] == 0
        self.tiny = torch.finfo(self.dtype).tiny


def _parallel(fn: Callable[[int], object], count: int) -> list:
    workers = max(1, min(torch.get_num_threads(), count))
    if workers == 1:
        return [fn(i) for i in range(count)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, range(count)))


def _failed(results: list[int]) -> list[int]:
    """Indices of non-finite weights (1); an allocation failure in the C loop (-1) raises."""
    if any(r < 0 for r in results):
        raise MemoryError("the C loop could not allocate its row buffers")
    return [i for i, r in enumerate(results) if r]


def amax(weights: Sequence[Weight]) -> torch.Tensor:
    """float32 [len(weights)]: max |w| per weight; NaN where a weight holds NaN."""
    lib = library()

    def one(i: int) -> float:
        source = _Source(i, weights[i])
        return 0.0 if source.empty else lib.moeq_amax(*source.args)

    return torch.tensor(_parallel(one, len(weights)), dtype=torch.float32)


def nvfp4(weights: Sequence[Weight], amax: torch.Tensor, outputs: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """Fill each weight's (packed, scales, scale_2) outputs; returns the indices of non-finite weights."""
    lib = library()
    values = amax.tolist()

    def one(i: int) -> int:
        source = _Source(i, weights[i])
        packed, scales, scale_2 = outputs[i]
        return lib.moeq_nvfp4(*source.args, values[i], packed.data_ptr(), scales.data_ptr(), scale_2.data_ptr())

    return _failed(_parallel(one, len(weights)))


def fp8(
    weights: Sequence[Weight],
    amax: Sequence[torch.Tensor | None],
    outputs: Sequence[Sequence[torch.Tensor]],
    per_channel: bool,
) -> list[int]:
    """Fill each weight's (codes, scale) outputs; returns the indices of non-finite weights.

    ``amax[i]``: float32 of the tensor (per tensor, one value) or of each row (per channel); None per
    channel: the loop takes each row's own max |w| in its pass."""

    def one(i: int) -> int:
        source = _Source(i, weights[i])
        codes, scale = outputs[i]
        given = amax[i].to(torch.float32).contiguous() if amax[i] is not None else None
        pointer = given.data_ptr() if given is not None else None
        return library().moeq_fp8(
            *source.args, pointer, int(per_channel), source.tiny, codes.data_ptr(), scale.data_ptr()
        )

    return _failed(_parallel(one, len(weights)))


def fp8_block(weights: Sequence[Weight], outputs: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """Fill each 2-D weight's (codes, weight_scale_inv) outputs; returns the indices of non-finite weights."""

    def one(i: int) -> int:
        source = _Source(i, weights[i])
        codes, scale = outputs[i]
        return library().moeq_fp8_block(*source.args, source.tiny, codes.data_ptr(), scale.data_ptr())

    return _failed(_parallel(one, len(weights)))

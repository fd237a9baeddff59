"""The CPU fast path: nvfp4_cpu.c compiled once with the system C compiler, called through ctypes.

Without a GPU the kernels would fall back to their torch references, which make ~25 passes over
float32 temporaries per weight.  The C loop does amax and NVFP4 in one pass per weight with the same
float32 operations (no fast-math, no contraction), and ctypes releases the GIL, so a thread per core
quantizes weights side by side.  The library is built on first use into the cache directory
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

from .formats import (
    DTYPE_CODES,
    E2M1_BOUNDS,
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    NVFP4_BLOCK_SIZE,
    NVFP4_SCALE_2_DIVISOR,
)
from .grouping import num_rows, row_stride

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
]


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
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.moeq_amax.argtypes = [ptr, ctypes.c_int, i64, i64, i64]
    lib.moeq_amax.restype = ctypes.c_float
    lib.moeq_nvfp4.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ctypes.c_float, ptr, ptr, ptr]
    lib.moeq_nvfp4.restype = ctypes.c_int
    return lib


def _geometry(index: int, w: torch.Tensor) -> tuple[int, int, int, int]:
    """(dtype code, rows, K, row stride) of a validated weight."""
    return DTYPE_CODES[w.dtype], num_rows(w), w.shape[-1], row_stride(index, w)


def _parallel(fn: Callable[[int], object], count: int) -> list:
    workers = max(1, min(torch.get_num_threads(), count))
    if workers == 1:
        return [fn(i) for i in range(count)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, range(count)))


def amax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """float32 [len(weights)]: max |w| per weight; NaN where a weight holds NaN."""
    lib = library()

    def one(i: int) -> float:
        w = weights[i]
        code, rows, k, stride = _geometry(i, w)
        return lib.moeq_amax(w.data_ptr(), code, rows, k, stride) if w.numel() else 0.0

    return torch.tensor(_parallel(one, len(weights)), dtype=torch.float32)


def nvfp4(weights: Sequence[torch.Tensor], amax: torch.Tensor, outputs: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """Fill each weight's (packed, scales, scale_2) outputs; returns the indices of non-finite weights."""
    lib = library()
    values = amax.tolist()

    def one(i: int) -> bool:
        w = weights[i]
        code, rows, k, stride = _geometry(i, w)
        packed, scales, scale_2 = outputs[i]
        return bool(
            lib.moeq_nvfp4(
                w.data_ptr(), code, rows, k, stride, values[i], packed.data_ptr(), scales.data_ptr(), scale_2.data_ptr()
            )
        )

    return [i for i, bad in enumerate(_parallel(one, len(weights))) if bad]

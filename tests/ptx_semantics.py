"""The Triton interpreter made to compute as the GPU's instructions are specified, for the HW kernel paths.

Why: the kernels' GPU formulation (HW=True) uses fma.rn.f32, min.f32 (returns the non-NaN operand),
cvt.rn(.satfinite) conversions (e4m3 -> f16 -> f32 for FP8-block sources among them) and, through inline
asm, rcp.approx.ftz.f32 in NVFP4's common regime, cvt.rn.bf16x2.f32 (a source's bf16 rounding) and abs.f32
(a source value's magnitude).  The
interpreter rounds its fma twice, propagates NaN through min, converts to float8 wrongly and has no
inline asm, so the GPU path cannot run there as is.  With these stand-ins (IEEE fma exactly; numpy's
fmin/fmax; torch's round-to-nearest-even casts, which saturate E4M3 like satfinite; a reciprocal up to
an ulp off), the GPU code path runs on CPU and is compared bit for bit with the references.  What stays
"on paper" until a device run: that the hardware instructions implement these IEEE / PTX definitions,
and that rcp.approx.ftz.f32 errs by no more than the refinement after it is checked for.
"""

from __future__ import annotations

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

TORCH_OF = {
    tl.float32: torch.float32,
    tl.bfloat16: torch.bfloat16,
    tl.float16: torch.float16,
    tl.float8e4nv: torch.float8_e4m3fn,
}
STORAGE_OF = {
    torch.float32: torch.float32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.float16,
    torch.float8_e4m3fn: torch.uint8,
}


def fma32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """float32 fma(x, y, z) rounded once: x*y is exact in float64, the sum's float64 rounding error is
    recovered exactly (TwoSum), and a float64 sum that lands on a float32 midpoint is settled by it."""
    x, y, z = (np.asarray(v, dtype=np.float32) for v in (x, y, z))
    with np.errstate(all="ignore"):
        p = x.astype(np.float64) * y.astype(np.float64)
        c = np.broadcast_to(z.astype(np.float64), p.shape)
        s = p + c
        bp = s - c  # Knuth's TwoSum of (c, p): s + err == c + p exactly
        err = (c - (s - bp)) + (p - bp)
        r = s.astype(np.float32)
        rd = r.astype(np.float64)
        toward = np.where(s > rd, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
        other = np.nextafter(r, toward).astype(np.float64)
        tie = (s != rd) & (s == (rd + other) / 2) & (err != 0) & np.isfinite(s)
        settled = np.where(err > 0, np.maximum(rd, other), np.minimum(rd, other)).astype(np.float32)
        return np.where(tie, settled, r).astype(np.float32)


def rcp_approx(d: np.ndarray) -> np.ndarray:
    """A stand-in for PTX rcp.approx.ftz.f32: the correctly rounded 1/d moved by -1, 0 or +1 ulp (by a
    hash of d's bits), so that what follows it must not depend on the approximation being exact.
    Subnormal inputs and results flush to zero (.ftz).  The real instruction's error bound is not proven
    here (the PTX ISA's bound was not at hand; NVIDIA's forum says about 1 ulp); tests/test_exact_division.py
    checks the refinement with r up to 64 ulps off."""
    d = np.asarray(d, dtype=np.float32)
    d = np.where(np.abs(d) < np.float32(2.0**-126), np.float32(0.0) * np.sign(d), d).astype(np.float32)
    with np.errstate(all="ignore"):
        exact = np.float32(1.0) / d
    bits = exact.view(np.int32)
    moved = (bits + ((d.view(np.int32) >> 5) % 3 - 1)).view(np.float32)
    r = np.where(np.isfinite(exact) & (exact != 0), moved, exact)
    return np.where(np.abs(r) < np.float32(2.0**-126), np.float32(0.0) * np.sign(r), r).astype(np.float32)


def cvt_rn_bf16x2_high(x: np.ndarray) -> np.ndarray:
    """``cvt.rn.bf16x2.f32 d, x, 0.0``: bf16(x) (round to nearest even, subnormals kept, NaN a NaN) in the
    high half, +0.0's bf16 (0x0000) in the low half: the float32 bits of the rounded value (torch's
    float32 -> bfloat16 cast rounds the same way)."""
    rounded = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).float()
    return rounded.numpy()


def abs_f32(x: np.ndarray) -> np.ndarray:
    """``abs.f32``: the sign bit cleared (subnormals kept; PTX leaves a NaN's sign unspecified, and a NaN only
    flags the tensor non-finite, so clearing it too is one of the allowed results)."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)).view(np.float32)


INLINE_ASM = {
    "rcp.approx.ftz.f32 $0, $1;": rcp_approx,
    "{ .reg .b32 z; mov.b32 z, 0; cvt.rn.bf16x2.f32 $0, $1, z; }": cvt_rn_bf16x2_high,
    "abs.f32 $0, $1;": abs_f32,
}
"""The PTX the kernels write through tl.inline_asm_elementwise, each with its stand-in."""


class _AsmCall:
    def __init__(self, handle) -> None:
        self.handle = handle

    def get_result(self, i: int):
        assert i == 0
        return self.handle


def _to_torch(data: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    storage = np.ascontiguousarray(data).view(
        {torch.int16: np.int16, torch.uint8: np.uint8}.get(
            STORAGE_OF[dtype], np.float32 if dtype == torch.float32 else np.float16
        )
    )
    return torch.from_numpy(storage.copy()).view(dtype)


def _to_numpy(t: torch.Tensor, like: np.dtype) -> np.ndarray:
    return t.view(STORAGE_OF[t.dtype]).numpy().view(like)


def use_ptx_semantics(monkeypatch) -> None:
    """Patch the interpreter's fma, NaN-ignoring min/max and float conversions (see module docstring)."""
    builder = interpreter.InterpreterBuilder
    original = builder.create_fp_to_fp

    def fp_to_fp(self, src, dst_type, rounding_mode):
        a, b = TORCH_OF.get(src.dtype.scalar), TORCH_OF.get(dst_type.scalar)
        if a is None or b is None or (rounding_mode is not None and "RTZ" in str(rounding_mode).upper()):
            return original(self, src, dst_type, rounding_mode)
        out = _to_torch(src.data, a).to(b)
        return interpreter.TensorHandle(_to_numpy(out, interpreter._get_np_dtype(dst_type)), dst_type.scalar)

    def convert(original_cast):
        def cast(self, src, dst_type):
            a, b = TORCH_OF.get(src.dtype.scalar), TORCH_OF.get(dst_type.scalar)
            if a is None or b is None:
                return original_cast(self, src, dst_type)
            out = _to_torch(src.data, a).to(b)  # round to nearest even (cvt.rn), subnormals kept
            return interpreter.TensorHandle(_to_numpy(out, interpreter._get_np_dtype(dst_type)), dst_type.scalar)

        return cast

    def fma(self, x, y, z):
        return interpreter.TensorHandle(fma32(x.data, y.data, z.data), z.dtype.scalar)

    def inline_asm(self, asm, constraints, values, types, is_pure, pack):
        if asm not in INLINE_ASM or len(values) != 1 or pack != 1:
            raise NotImplementedError(f"no PTX stand-in for {asm!r}")
        return _AsmCall(interpreter.TensorHandle(INLINE_ASM[asm](values[0].data), values[0].dtype.scalar))

    monkeypatch.setattr(builder, "create_fp_to_fp", fp_to_fp)
    monkeypatch.setattr(builder, "create_fma", fma)
    monkeypatch.setattr(builder, "create_inline_asm", inline_asm)

    monkeypatch.setattr(builder, "create_fp_trunc", convert(builder.create_fp_trunc))
    monkeypatch.setattr(builder, "create_fp_ext", convert(builder.create_fp_ext))
    monkeypatch.setattr(builder, "create_minnumf", lambda self, a, b: self.binary_op(a, b, np.fmin))
    monkeypatch.setattr(builder, "create_maxnumf", lambda self, a, b: self.binary_op(a, b, np.fmax))

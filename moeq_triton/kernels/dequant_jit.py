"""The jit side of ``dequant``: an FP8-block source's codes decoded inside the quantization kernels.

The e4m3 code decoded exactly, one float32 product with its block's scale, one round-to-nearest-even to
bf16, kept as the float32 of that bf16 value: ``dequant.dequantize_fp8_block_reference``'s computation.
Imported only on a Triton launch (the launchers import the ``*_jit`` modules lazily).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .rounding import round_to_dtype

_E4M3_TO_FLOAT32 = tl.constexpr(2.0**120)  # e4m3 bits << 20 read as float32 are the value times 2^-120


@triton.jit
def e4m3_values(codes, HW: tl.constexpr):
    """Exact float32 values of float8_e4m3fn codes (a uint8 tensor); 0x7F / 0xFF are NaN.

    HW: the GPU's cvt.rn.f16x2.e4m3x2 (two codes per instruction; every e4m3 value is an f16) and f16 ->
    float32.  Otherwise bit placement: the 7 magnitude bits << 20 are a float32 (normal or subnormal)
    equal to the value times 2^-120, so one multiply by 2^120 is exact; the sign bit goes to bit 31."""
    if HW:
        return codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    b = codes.to(tl.int32)
    magnitude = b & 0x7F
    value = (magnitude << 20).to(tl.float32, bitcast=True) * _E4M3_TO_FLOAT32
    value = tl.where(magnitude == 0x7F, float("nan"), value)
    return ((b & 0x80) << 24 | value.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def bf16_round(p, HW: tl.constexpr):
    """float32 ``p`` rounded to the nearest bfloat16 (ties to even, subnormals kept), as a float32.

    HW: one cvt.rn.bf16x2.f32 with +0.0 as the low half: the packed result's bits are already the
    float32 of the bf16 value (no shift to widen it back).  Otherwise the bit rounding of round_to_dtype.
    tests/ptx_semantics.py defines the instruction for the interpreter."""
    if HW:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 z; mov.b32 z, 0; cvt.rn.bf16x2.f32 $0, $1, z; }",
            "=r,r",
            [p],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    return round_to_dtype(p, 1, False)


@triton.jit
def source_values(codes, scale, HW: tl.constexpr):
    """The bf16 values (as float32) that FP8-block codes stand for: fl32(e4m3 * scale) rounded to bf16,
    what ``dequantize_fp8_block_reference`` computes; ``scale`` broadcasts against ``codes``."""
    return bf16_round(e4m3_values(codes, HW) * scale, HW)


@triton.jit
def source_magnitude(x, HW: tl.constexpr):
    """|x| of ``source_values``' result.

    HW: an abs.f32 in inline asm.  LLVM rewrites a fabs of the inline asm's result (bf16_round) as an
    integer AND with 0x7FFFFFFF, a LOP3 per element that ptxas cannot fold as an |operand| modifier into
    the FMUL / FMNMX using it (issue 25; the bf16-source kernels get the fold).  Same bits: the sign bit
    cleared (a NaN's sign is unspecified by PTX; a NaN only flags the tensor non-finite).
    tests/ptx_semantics.py defines the instruction for the interpreter."""
    if HW:
        return tl.inline_asm_elementwise("abs.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    return tl.abs(x)

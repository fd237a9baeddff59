"""The NVFP4 and FP8 (E4M3) number formats: every constant of the math lives here, once.

Values follow ModelOpt 0.47's export (``NVFP4QTensor``, ``to_quantized_weight``); docs/numerics.md derives
each step (sections "E4M3 (float8_e4m3fn)", "E2M1 (FP4)", "NVFP4", "FP8 block (128x128)").
"""

import torch

E2M1_MAX = 6.0
"""Largest FP4 (E2M1) magnitude."""

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""FP4 magnitudes by 3-bit code; bit 3 of a nibble is the sign."""

E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
"""Midpoints between neighbouring E2M1 magnitudes; a tie rounds to the even code."""

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""Weight dtypes the kernels accept, and the code each has in Triton constexprs and the C loop."""

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn magnitude; conversions saturate here."""

E4M3_MIN_SUBNORMAL = 2.0**-9
"""Smallest positive E4M3 value: the lower clamp of an NVFP4 block scale."""

NVFP4_BLOCK_SIZE = 16
"""Elements along the last dim that share one E4M3 block scale."""

NVFP4_SCALE_2_DIVISOR = E2M1_MAX * E4M3_MAX
"""weight_scale_2 = amax / 2688: the largest block scale then maps to E4M3_MAX."""

FP8_BLOCK_SIZE = 128
"""Rows and columns under one float32 scale in the FP8-block layout (DeepSeek-V3, Qwen *-FP8; source or output)."""


def float32_reciprocal(c: float) -> float:
    """float32(1 / c), correctly rounded, as torch's CUDA kernel computes it for the scalar c."""
    return (torch.tensor(1.0) / torch.tensor(c, dtype=torch.float32)).item()


# NVFP4's common regime on the GPU path (kernels/nvfp4.py): COMMON_AMAX_MIN <= amax <= COMMON_AMAX_MAX[dtype],
# decided on the device per tensor.  Every block divisor d = fl(scale * weight_scale_2) lies in [2^-85, 2^14],
# so the division needs no power-of-two prescale (its intermediates are normal wherever the result matters),
# and no non-zero weight's quotient underflows to +-0 (2^-133 / 2^14 > 2^-150; float32 weights, down to
# 2^-149, need d < 2, hence amax <= 8), so an E2M1 sign is simply x < 0.  tests/kernels/test_exact_division.py
# proves it.
COMMON_AMAX_MIN = 2.0**-64
COMMON_AMAX_MAX = {torch.bfloat16: 2.0**16, torch.float16: 2.0**16, torch.float32: 2.0**3}

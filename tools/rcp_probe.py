"""On a GPU: how far is rcp.approx.ftz.f32 from 1/d, and does NVFP4's reciprocal come out exact?

    python -m tools.rcp_probe   (needs CUDA; benchmarks/device_check.sh runs it)

NVFP4's common-regime launch takes fl32(1/d) per block from ``rounding.approximate_reciprocal``
(rcp.approx.ftz.f32) and ``rounding.refine_reciprocal`` (two Newton steps and a fix-up).  On the CPU the
refinement is proven for every float32 mantissa from starts up to 64 ulps off
(tests/test_exact_division.py); that the instruction stays within those 64 ulps is on paper.  This runs the
very jit functions on the device over every mantissa at the regime's extreme exponents and prints the
instruction's largest error in ulps and the refined results that differ from IEEE division on the CPU;
it exits 1 on any difference or an error above 64 ulps.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from moeq_triton.kernels.rounding import approximate_reciprocal, refine_reciprocal

BLOCK = 1024
CHECKED_ULPS = 64  # what test_refined_reciprocal_every_mantissa covers


@triton.jit
def _probe(d_ptr, approx_ptr, refined_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.load(d_ptr + i, mask=i < N, other=1.0)
    r = approximate_reciprocal(d)
    tl.store(approx_ptr + i, r, mask=i < N)
    tl.store(refined_ptr + i, refine_reciprocal(d, r), mask=i < N)


def main() -> int:
    if not torch.cuda.is_available():
        print("rcp probe: no CUDA device")
        return 1
    mantissas = (torch.arange(1 << 23, dtype=torch.int32) | (127 << 23)).view(torch.float32)
    failed = False
    for scale in (1.0, 2.0**-85, 2.0**13):  # the common regime's divisors lie in [2^-85, 2^14]
        d = mantissas * scale
        exact = 1.0 / d  # IEEE float32 division on the CPU
        dev = d.cuda()
        approx, refined = torch.empty_like(dev), torch.empty_like(dev)
        _probe[(triton.cdiv(d.numel(), BLOCK),)](dev, approx, refined, d.numel(), BLOCK)
        ulps = (approx.cpu().view(torch.int32).long() - exact.view(torch.int32).long()).abs()
        wrong = int((refined.cpu().view(torch.int32) != exact.view(torch.int32)).sum())
        print(f"rcp probe d = m * {scale}: rcp.approx max error {int(ulps.max())} ulp; refined != 1/d: {wrong}")
        failed |= wrong > 0 or int(ulps.max()) > CHECKED_ULPS
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

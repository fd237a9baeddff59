"""The GPU formulation (HW=True) of the kernels, exhaustively: no IEEE division per element, same bits.

The kernels replace ``x / d`` by a power-of-two prescale, a reciprocal and two FMAs
(rounding.divisor_parts / rounding.quotient) and round to E2M1 with one float add
(rounding.e2m1_magnitude_code).  Both are pure functions of float32 bit patterns, so they are checked
here by running the very jit functions under the interpreter with the PTX semantics of their
instructions (tests/ptx_semantics.py) over:
- every fp16 mantissa (bf16's are a subset) against every divisor mantissa the kernels can form from
  a bf16 / fp16 amax (FP8 scales rounded to the weight dtype, amax * fl32(1/448), amax / 448, and
  NVFP4's E4M3 block scale * weight_scale_2 for both divisions by 2688), plus random float32 ones;
  the computation is scale-invariant while its intermediates are normal, so one binade of each
  covers every normal quotient;
- every finite bf16 and fp16 magnitude against divisors at the extreme exponents (subnormal, 2^-127,
  2^127, the largest float), where the prescale matters;
- the E2M1 encoder on every float32 in [2^-4, 8) whose low mantissa bits are 0, 1 or all ones (every
  rounding position, tie and sticky case), plus random values, NaN and beyond 6.
Then the kernels themselves run with HW=True against the references and ModelOpt.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from assertions import assert_bitwise_equal, assert_results_equal
from moeq_triton.kernels import fp8 as fp8_module
from moeq_triton.kernels import (
    grouped_amax_reference,
    quantize_fp8,
    quantize_fp8_reference,
    quantize_nvfp4,
    quantize_nvfp4_reference,
)
from moeq_triton.kernels import nvfp4 as nvfp4_module
from moeq_triton.kernels.formats import E4M3_MAX, NVFP4_SCALE_2_DIVISOR
from moeq_triton.kernels.nvfp4 import e2m1_codes_reference
from moeq_triton.kernels.rounding import divisor_parts, e2m1_magnitude_code, float32_reciprocal, quotient
from ptx_semantics import fma32, use_ptx_semantics

from benchmarks.modelopt_oracle import fp8_channel_export, fp8_export, nvfp4_export

BLOCK = 1 << 14
LOW = 2.0**-100


@triton.jit
def _quotient_probe(a_ptr, d_ptr, q_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i, mask=i < N, other=1.0)
    minus_S, D, minus_I = divisor_parts(tl.load(d_ptr + i, mask=i < N, other=1.0))
    tl.store(q_ptr + i, quotient(a * minus_S, D, minus_I), mask=i < N)


@triton.jit
def _code_probe(q_ptr, c_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(c_ptr + i, e2m1_magnitude_code(tl.load(q_ptr + i, mask=i < N, other=0.0)), mask=i < N)


def run_quotient(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    q = torch.empty_like(a)
    _quotient_probe[(triton.cdiv(a.numel(), BLOCK),)](a, d, q, a.numel(), BLOCK)
    return q


def check_quotients(a: torch.Tensor, d: torch.Tensor, what: str) -> None:
    """Quotients in [2^-100, 2^100] bit-exact; smaller ones stay below 2^-99 (the kernels need no more:
    FP8 bytes are 0 below 2^-10, E2M1 codes 0 below 0.25, block scales clamp at 2^-9); overflowing
    ones huge or NaN.  (Below 2^-100 the FMA residual can be subnormal, hence inexact.)"""
    q = run_quotient(a, d)
    exact = a / d  # IEEE float32 division (torch on CPU)
    normal = (exact >= LOW) & (exact <= 2.0**100)
    assert_bitwise_equal(q[normal], exact[normal], f"{what}: quotient in [2^-100, 2^100]")
    small = exact < LOW
    assert bool((q[small] < 2.0**-99).all()), f"{what}: a quotient below 2^-100 came out large"
    big = exact > 2.0**100
    assert bool(((q[big] > 2.0**99) | q[big].isnan()).all()), f"{what}: an overflowing quotient came out small"


def test_fma_stand_in_rounds_once():
    """The stand-in for fma.rn.f32 the proofs rest on, against exact rational arithmetic (seed 5)."""
    from fractions import Fraction

    gen = torch.Generator().manual_seed(5)
    x, y, z = (
        torch.randn(3000, generator=gen) * torch.exp2(torch.randint(-30, 30, (3000,), generator=gen).float())
        for _ in "xyz"
    )
    z[:1000] = -(x[:1000].double() * y[:1000].double()).float()  # heavy cancellation
    x[-1], y[-1], z[-1] = 2.0**-31 - 2.0**-54, -(0.5 + 2.0**-24), 2.0**-8 + 2.0**-31  # sum lands on a midpoint
    got = torch.from_numpy(fma32(x.numpy(), y.numpy(), z.numpy()))
    for i in range(len(x)):
        exact = Fraction(x[i].item()) * Fraction(y[i].item()) + Fraction(z[i].item())
        below = torch.tensor(float(exact), dtype=torch.float64).float()  # a candidate; checked exactly below
        cands = [below, below.nextafter(torch.tensor(float("inf"))), below.nextafter(torch.tensor(float("-inf")))]
        best = min(cands, key=lambda c: (abs(Fraction(c.item()) - exact), int(c.view(torch.int32)) & 1))
        assert got[i].item() == best.item(), f"fma32 case {i}: {x[i].item()}, {y[i].item()}, {z[i].item()}"


def mantissas(dtype: torch.dtype) -> torch.Tensor:
    """Every value of ``dtype`` in [1, 2), as float32."""
    bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    return (1 + torch.arange(1 << bits, dtype=torch.float64) / (1 << bits)).float()


def to_unit_binade(x: torch.Tensor) -> torch.Tensor:
    """x * 2^-floor(log2 x): the same mantissa in [1, 2) (exact power-of-two scaling)."""
    m, e = torch.frexp(x)
    return m * 2.0


def divisor_mantissas(seed: int) -> torch.Tensor:
    """Divisor mantissas the kernels form from a bf16 / fp16 amax, plus random float32 ones.  FP8 per
    channel and the 128x128 blocks of fp8_block divide by amax * fl32(1/448) (CUDA) or amax / 448."""
    amax = mantissas(torch.float16)  # bf16 mantissas are a subset
    e4m3 = torch.arange(8, 16, dtype=torch.float32) / 8  # E4M3 mantissas (subnormals repeat them)
    parts = [amax, amax * float32_reciprocal(E4M3_MAX), amax / E4M3_MAX]
    for s2 in (amax * float32_reciprocal(NVFP4_SCALE_2_DIVISOR), amax / NVFP4_SCALE_2_DIVISOR):
        parts.append((e4m3[:, None] * s2[None, :]).reshape(-1))
    gen = torch.Generator().manual_seed(seed)
    parts.append(1 + torch.rand(4096, generator=gen))
    return to_unit_binade(torch.cat(parts)).unique()


@pytest.fixture
def ptx(monkeypatch):
    use_ptx_semantics(monkeypatch)


@pytest.mark.slow
def test_quotient_every_mantissa_pair(ptx):
    seed = 12
    d = divisor_mantissas(seed)
    gen = torch.Generator().manual_seed(seed)
    a = torch.cat([mantissas(torch.float16), 1 + torch.rand(128, generator=gen)])
    for lo in range(0, len(a), 64):
        chunk = a[lo : lo + 64]
        pairs_a = chunk[:, None].expand(-1, len(d)).reshape(-1).contiguous()
        pairs_d = d[None, :].expand(len(chunk), -1).reshape(-1).contiguous()
        check_quotients(pairs_a, pairs_d, f"mantissas (seed {seed}, dividends {lo}..)")


@pytest.mark.slow
def test_quotient_extreme_exponents(ptx):
    finite = []
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16)):
        every = torch.arange(0, 1 << 15, dtype=torch.int32).to(bits).view(dtype).float()
        finite.append(every[torch.isfinite(every)])
    a = torch.cat(finite).unique()
    m = torch.tensor([1.0, 1 + 2.0**-7, 1.25, 1.5, 1.75, 1 + 2.0**-23, 2 - 2.0**-23, 4 / 3])
    exps = torch.tensor([-149, -140, -133, -128, -127, -126, -125, -64, -10, 0, 10, 64, 120, 126, 127])
    d = (m[:, None].double() * torch.pow(2.0, exps[None, :].double())).reshape(-1).float()
    d = torch.cat([d, torch.tensor([2.0**-149, torch.finfo(torch.float32).max])])
    d = d[d > 0].unique()
    for lo in range(0, len(d), 8):
        chunk = d[lo : lo + 8]
        pairs_a = a[None, :].expand(len(chunk), -1).reshape(-1).contiguous()
        pairs_d = chunk[:, None].expand(-1, len(a)).reshape(-1).contiguous()
        check_quotients(pairs_a, pairs_d, f"extremes (divisors {chunk.tolist()})")


def test_e2m1_encoder_every_rounding_case(ptx):
    seed = 7
    exps = torch.arange(-4, 3)
    high = torch.arange(1 << 12, dtype=torch.int64) << 11  # the top 12 mantissa bits
    low = torch.tensor([0, 1, (1 << 11) - 1])
    bits = ((exps[:, None, None] + 127) << 23) | high[None, :, None] | low[None, None, :]
    structured = bits.reshape(-1).to(torch.int32).view(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    extra = torch.tensor([0.0, 2.0**-149, 1e-30, 6.0, 7.0, 8.0, 1e30, float("inf"), float("nan")])
    q = torch.cat([structured, torch.rand(1 << 18, generator=gen) * 8, extra])
    codes = torch.empty(q.shape, dtype=torch.int32)
    _code_probe[(triton.cdiv(q.numel(), BLOCK),)](q, codes, q.numel(), BLOCK)
    expected = e2m1_codes_reference(q).to(torch.int32)
    expected[q.isinf()] = 7
    assert_bitwise_equal(codes, expected, f"E2M1 codes (seed {seed})")


# ---------------------------------------------------------------- the kernels on their GPU path


@pytest.fixture
def gpu_path(monkeypatch, ptx):
    """HW=True in every launch, as on CUDA (the device's other decisions stay CPU's, like the references)."""
    monkeypatch.setattr(fp8_module, "hardware_math", lambda device: True)
    monkeypatch.setattr(nvfp4_module, "hardware_math", lambda device: True)


def heavy(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) ** 3
    w[..., :: max(1, shape[-1] // 5)] *= 40
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_gpu_path_matches_reference_and_modelopt(gpu_path, dtype):
    seed = 21
    weights = [heavy((5, 48), dtype, seed), heavy((3, 272), dtype, seed + 1), heavy((2, 3, 32), dtype, seed + 2)]
    amax = grouped_amax_reference(weights)
    clipped = amax / 16  # saturation
    for given in (amax, clipped):
        for w, a, r in zip(weights, given, quantize_fp8(weights, given)):
            assert_results_equal(r, quantize_fp8_reference(w, a), f"per tensor, seed {seed}")
            flat = fp8_export(w.reshape(-1, w.shape[-1]), a)
            assert_bitwise_equal(r.weight.reshape(flat.weight.shape), flat.weight, "modelopt per tensor")
    rows = [w.abs().amax(-1).float() for w in weights]
    for w, a, r in zip(weights, rows, quantize_fp8(weights, per_channel=True)):
        assert_results_equal(r, quantize_fp8_reference(w, a, True), f"per channel, seed {seed}")
        if w.dim() == 2:
            assert_results_equal(r, fp8_channel_export(w, a), "modelopt per channel")


def test_fp8_gpu_path_every_e4m3_value_and_midpoint(gpu_path):
    finite = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = finite[torch.isfinite(finite)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    values = torch.cat(
        [
            finite,
            mids,
            mids.nextafter(torch.tensor(-1e9)),
            mids.nextafter(torch.tensor(1e9)),
            torch.tensor([-0.0, 449.0, 464.0, 500.0, 1e4, 2.0**-10, 2.0**-11, 1e-30]),
        ]
    )
    values = torch.cat([values, -values, torch.zeros((-2 * len(values)) % 16)]).reshape(-1, 16)
    amax = torch.tensor([448.0])
    (r,) = quantize_fp8([values], weight_amax=amax)
    assert_results_equal(r, quantize_fp8_reference(values, amax[0]), "reference")
    assert_results_equal(r, fp8_export(values, amax[0]), "modelopt")


def nvfp4_edges(dtype: torch.dtype) -> torch.Tensor:
    """Ties, -0.0, zero blocks, clamped and subnormal scales, and quotients that underflow to -0.0
    (a huge and a tiny negative value in one block: the sign bit must follow IEEE's zero)."""
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).smallest_normal * 2.0**-3 if dtype != torch.float16 else 2.0**-24
    rows = [
        [2688.0] + [0.0] * 15,
        [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.0],
        [6.0, -0.0, -1e-3, 1e-3, -0.2, 0.2, -0.0, 0.0] + [0.1] * 8,
        [0.0] * 16,
        [6.0 * 2.0**-12] * 16,
        [6.0 * 2.0**-10, -(2.0**-12)] + [2.0**-13] * 14,
        [big, -tiny, tiny, -2 * tiny, -big / 3] + [-tiny] * 11,
        [big / 2, -big / 2, -tiny * 4] + [0.0] * 13,
        [tiny, -tiny] + [0.0] * 14,  # block scale b / (6 s2) underflows: to 0 (-> 1.0) or not (-> 2^-9)
        [tiny * 3, tiny * 2] + [-tiny] * 14,
    ]
    return torch.tensor(rows, dtype=torch.float64).clamp(-big, big).to(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nvfp4_gpu_path_matches_reference_and_modelopt(gpu_path, dtype):
    seed = 33
    weights = [
        heavy((5, 48), dtype, seed),
        heavy((3, 272), dtype, seed + 1),
        heavy((2, 3, 32), dtype, seed + 2),
        nvfp4_edges(dtype),
    ]
    amax = grouped_amax_reference(weights)
    larger = (amax.double() * 4).clamp(max=torch.finfo(dtype).max).float()  # ModelOpt holds amax in the dtype
    for given in (amax, amax / 16, larger):  # exact, saturating, small scales
        for i, (w, a, r) in enumerate(zip(weights, given, quantize_nvfp4(weights, given))):
            assert_results_equal(r, quantize_nvfp4_reference(w, a), f"reference weights[{i}], seed {seed}")
            assert_results_equal(r, nvfp4_export(w, a), f"modelopt weights[{i}], seed {seed}")

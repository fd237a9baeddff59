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

from moeq_triton.kernels import fp8 as fp8_module
from moeq_triton.kernels import (
    grouped_amax_reference,
    quantize_fp8,
    quantize_fp8_reference,
    quantize_nvfp4,
    quantize_nvfp4_reference,
)
from moeq_triton.kernels import nvfp4 as nvfp4_module
from moeq_triton.kernels.formats import (
    COMMON_AMAX_MIN,
    E2M1_BOUNDS,
    E2M1_MAX,
    E4M3_MAX,
    NVFP4_SCALE_2_DIVISOR,
    float32_reciprocal,
)
from moeq_triton.kernels.nvfp4 import e2m1_codes_reference
from moeq_triton.kernels.rounding import (
    E2M1_CODE_BIAS,
    approximate_reciprocal,
    common_quotient,
    divisor_parts,
    e2m1_biased_signed_code,
    e2m1_magnitude_code,
    quotient,
    refine_reciprocal,
    sign_bit_as_8,
)
from moeq_triton.modelopt.oracle import fp8_channel_export, fp8_export, nvfp4_export
from tests.assertions import assert_bitwise_equal, assert_results_equal
from tests.ptx_semantics import fma32, use_ptx_semantics

BLOCK = 1 << 14
LOW = 2.0**-100


@triton.jit
def _quotient_probe(a_ptr, d_ptr, q_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i, mask=i < N, other=1.0)
    minus_S, D, minus_I = divisor_parts(tl.load(d_ptr + i, mask=i < N, other=1.0))
    tl.store(q_ptr + i, quotient(a * minus_S, D, minus_I), mask=i < N)


@triton.jit
def _code_probe(q_ptr, c_ptr, s_ptr, N, BLOCK: tl.constexpr):
    """E2M1 magnitude codes, and the signed ones (bias removed) with every other value negative."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    q = tl.load(q_ptr + i, mask=i < N, other=0.0)
    tl.store(c_ptr + i, e2m1_magnitude_code(q), mask=i < N)
    tl.store(s_ptr + i, e2m1_biased_signed_code(q, tl.where((i % 2) == 1, 8, 0)) - E2M1_CODE_BIAS, mask=i < N)


@triton.jit
def _common_probe(x_ptr, d_ptr, q_ptr, c_ptr, N, BLOCK: tl.constexpr):
    """NVFP4's common-regime division as the kernel does it: fl(1/d) once, then common_quotient; the
    code's sign from the quotient's sign bit."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < N, other=1.0)
    d = tl.load(d_ptr + i, mask=i < N, other=1.0)
    q = common_quotient(x, -d, tl.div_rn(1.0, d))
    tl.store(q_ptr + i, q, mask=i < N)
    tl.store(c_ptr + i, e2m1_biased_signed_code(tl.abs(q), sign_bit_as_8(q)) - E2M1_CODE_BIAS, mask=i < N)


@triton.jit
def _reciprocal_probe(d_ptr, r_ptr, out_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.load(d_ptr + i, mask=i < N, other=1.0)
    tl.store(out_ptr + i, refine_reciprocal(d, tl.load(r_ptr + i, mask=i < N, other=1.0)), mask=i < N)


@triton.jit
def _approximate_reciprocal_probe(d_ptr, out_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, approximate_reciprocal(tl.load(d_ptr + i, mask=i < N, other=1.0)), mask=i < N)


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


def common_regime_divisors() -> dict[str, tuple[float, float]]:
    """[smallest, largest] divisor of NVFP4's common regime, from its amax bounds, for both forms of
    amax / 2688 (CUDA: amax * fl32(1/2688); CPU: IEEE): the block scale's d = fl(E4M3 scale * s2), scale in
    [2^-9, 448], and the block-scale division's scale_unit = fl(6 * s2)."""
    out = {}
    for dtype, amax_max in nvfp4_module.COMMON_AMAX_MAX.items():
        ends = torch.tensor([COMMON_AMAX_MIN, amax_max], dtype=torch.float32)
        s2 = torch.cat([ends * float32_reciprocal(NVFP4_SCALE_2_DIVISOR), ends / NVFP4_SCALE_2_DIVISOR])
        d = torch.cat([s2 * 2.0**-9, s2 * E4M3_MAX, s2 * 6.0])
        out[str(dtype)] = (d.min().item(), d.max().item())
    return out


def every_finite(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit dtype, both signs (-0.0 included), as float32."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    return every[torch.isfinite(every)]


def check_common_quotients(x: torch.Tensor, d: torch.Tensor, what: str) -> None:
    """What the common-regime kernel needs of ``common_quotient``: q bit-exact where |x / d| is in
    [2^-10, 2^10] (E2M1 codes change in [0.25, 6], E4M3 block scales in [2^-9, 448]); the E2M1 magnitude
    code right everywhere (NaN from an overflow -> 7, as min.f32 gives) and, where a kernel's quotients
    lie, the sign taken from q's sign bit equal to ModelOpt's (x / d < 0): so +-0.0 give +0.0 and no
    non-zero x has an IEEE quotient of +-0; below 2^-10 |q| stays below 2^-9 (the scale clamp), above
    2^10 above 448 or NaN (saturation)."""
    q = torch.empty_like(x)
    code = torch.empty(x.shape, dtype=torch.int32)
    _common_probe[(triton.cdiv(x.numel(), BLOCK),)](x, d, q, code, x.numel(), BLOCK)
    exact = x / d  # IEEE float32 division (torch on CPU)
    mag = exact.abs()
    middle = (mag >= 2.0**-10) & (mag <= 2.0**10)
    assert_bitwise_equal(q[middle], exact[middle], f"{what}: quotient in [2^-10, 2^10]")
    expected = e2m1_codes_reference(exact).to(torch.int32)
    assert_bitwise_equal(code & 7, expected & 7, f"{what}: E2M1 magnitude codes")
    # the sign too wherever a kernel can divide: |x| <= amax and d >= 2^-9 * amax / 2688, so |x / d| <=
    # 2^20.4 (beyond 2^101 the quotient overflows to a NaN whose sign bit the hardware chooses)
    reachable = mag <= 2.0**100
    assert_bitwise_equal(code[reachable], expected[reachable], f"{what}: signed E2M1 codes")
    assert bool(((exact != 0) | (x == 0)).all()), f"{what}: a non-zero x / d underflowed to 0"
    assert bool((q[x == 0].view(torch.int32) == 0).all()), f"{what}: +-0.0 did not give +0.0"
    got = q.abs()
    assert bool((got[mag < 2.0**-10] < 2.0**-9).all()), f"{what}: a quotient below 2^-10 came out >= 2^-9"
    big = got[mag > 2.0**10]
    assert bool(((big > E4M3_MAX) | big.isnan()).all()), f"{what}: a quotient above 2^10 came out <= 448"


def test_common_regime_bounds_are_the_proven_ones():
    """The divisor ranges the common-regime proof below covers contain what the regime's amax bounds give."""
    ranges = common_regime_divisors()
    for lo, hi in ranges.values():
        assert COMMON_D_MIN <= lo and hi <= COMMON_D_MAX_16
    assert ranges[str(torch.float32)][1] < 2.0  # float32 weights: 2^-149 / d must not round to 0


COMMON_D_MIN = 2.0**-85  # below every divisor of the regime
COMMON_D_MAX_16 = 2.0**14  # above every divisor of the regime (16-bit weights)


def common_divisors(hi: float) -> torch.Tensor:
    """Divisors at the regime's exponents, extremes included: a spread of mantissas (ends, middle, NVFP4
    products) at exponents from 2^-85 to ``hi``, plus the exact extreme divisors."""
    m = torch.cat([torch.tensor([1.0, 1 + 2.0**-23, 1.5, 2 - 2.0**-23, 4 / 3]), divisor_mantissas(12)[::6000]])
    top = int(torch.tensor(hi).log2().ceil().item())
    # every exponent near the ends (where x * J, the residual or the quotient leave the normal range),
    # a spread in between (where everything is normal and scales exactly)
    exps = torch.tensor([*range(-85, -69), -64, -48, -32, -16, *range(max(-15, top - 10), top)], dtype=torch.float64)
    d = (m[:, None].double() * torch.pow(2.0, exps[None, :])).reshape(-1).float()
    ends = torch.tensor([v for pair in common_regime_divisors().values() for v in pair])
    d = torch.cat([d, ends])
    return d[(d >= COMMON_D_MIN) & (d <= hi)].unique()


@pytest.mark.slow
def test_common_regime_every_16bit_value_at_the_regime_ends(ptx):
    """Every finite bf16 and fp16 value (both signs, subnormals, -0.0) against divisors at every exponent
    near the regime's ends (2^-85 .. 2^-70, 2^4 .. 2^13) and a spread between.  Where intermediates are
    normal the computation scales with powers of two, so with test_quotient_every_mantissa_pair (the same
    three operations up to exact negations, every mantissa pair) this covers every divisor mantissa; the
    ends are where subnormals appear."""
    x = torch.cat([every_finite(torch.bfloat16), every_finite(torch.float16)]).unique()
    d = common_divisors(COMMON_D_MAX_16)
    for lo in range(0, len(d), 8):
        chunk = d[lo : lo + 8]
        pairs_x = x[None, :].expand(len(chunk), -1).reshape(-1).contiguous()
        pairs_d = chunk[:, None].expand(-1, len(x)).reshape(-1).contiguous()
        check_common_quotients(pairs_x, pairs_d, f"common regime (divisors {chunk.tolist()})")


@pytest.mark.slow
def test_common_regime_float32_values(ptx):
    """float32 weights (regime amax <= 8, divisors below 1.34): every exponent, both signs, ends and random
    mantissas (seed 14), including the smallest subnormal."""
    seed = 14
    gen = torch.Generator().manual_seed(seed)
    mant = torch.cat([torch.tensor([0, 1, (1 << 23) - 1, 1 << 22]), torch.randint(0, 1 << 23, (28,), generator=gen)])
    exps = torch.arange(0, 255)  # biased; 0 is subnormal (mantissa 0 there: +-0.0)
    bits = (exps[:, None] << 23) | mant[None, :]
    x = bits.reshape(-1).to(torch.int32).view(torch.float32)
    x = torch.cat([x, -x])
    d = common_divisors(common_regime_divisors()[str(torch.float32)][1])
    for lo in range(0, len(d), 16):
        chunk = d[lo : lo + 16]
        pairs_x = x[None, :].expand(len(chunk), -1).reshape(-1).contiguous()
        pairs_d = chunk[:, None].expand(-1, len(x)).reshape(-1).contiguous()
        check_common_quotients(pairs_x, pairs_d, f"common regime, float32 (seed {seed}, divisors {chunk.tolist()})")


def test_rcp_approx_stand_in_errs_by_an_ulp_either_way(ptx):
    """The stand-in for rcp.approx.ftz.f32 (through the kernels' own inline asm): within an ulp of the
    correctly rounded 1/d, off by -1, 0 and +1 ulp each for some d, subnormals flushed (seed 9)."""
    gen = torch.Generator().manual_seed(9)
    d = torch.cat(
        [(1 + torch.rand(4096, generator=gen)) * torch.exp2(torch.randint(-125, 126, (4096,), generator=gen))]
    )
    d = torch.cat([d, -d, torch.tensor([2.0**-130, 2.0**127 * 1.5])])
    r = torch.empty_like(d)
    _approximate_reciprocal_probe[(triton.cdiv(d.numel(), BLOCK),)](d, r, d.numel(), BLOCK)
    exact = 1.0 / d
    ulps = r[:-2].view(torch.int32) - exact[:-2].view(torch.int32)
    assert set(ulps.unique().tolist()) == {-1, 0, 1}
    assert r[-2].item() == float("inf") and r[-1].item() == 0.0  # .ftz: subnormal input, subnormal result


@pytest.mark.slow
def test_refined_reciprocal_every_mantissa(ptx):
    """refine_reciprocal gives the correctly rounded 1/d for every float32 mantissa from every start
    r = fl32(1/d) + k ulps, k in 0, +-1, +-2, +-3, +-4, +-16, +-64 (without its fix-up, 2 - 2^-23 fails for
    every k != 0); then at the common regime's extreme exponents for a sample.  Newton's steps scale
    with powers of two while everything is normal (d, 1/d, the residual 1 - d*r as a number near 2^-24)."""
    d = (torch.arange(1 << 23, dtype=torch.int32) | (127 << 23)).view(torch.float32)
    exact = 1.0 / d
    out = torch.empty_like(d)
    for k in (0, 1, -1, 2, -2, 3, -3, 4, -4, 16, -16, 64, -64):
        r = (exact.view(torch.int32) + k).view(torch.float32)
        _reciprocal_probe[(triton.cdiv(d.numel(), BLOCK),)](d, r, out, d.numel(), BLOCK)
        assert_bitwise_equal(out, exact, f"every mantissa, start {k} ulps off")
    gen = torch.Generator().manual_seed(10)
    sample = torch.cat([d[torch.randint(0, 1 << 23, (1 << 14,), generator=gen)], d[-4:]])
    for scale in (2.0**-85, 2.0**13):
        ds = sample * scale
        exact = 1.0 / ds
        for k in (-4, -1, 1, 4):
            r = (exact.view(torch.int32) + k).view(torch.float32)
            out = torch.empty_like(ds)
            _reciprocal_probe[(triton.cdiv(ds.numel(), BLOCK),)](ds, r, out, ds.numel(), BLOCK)
            assert_bitwise_equal(out, exact, f"divisors * {scale}, start {k} ulps off")


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
    codes, signed = torch.empty(q.shape, dtype=torch.int32), torch.empty(q.shape, dtype=torch.int32)
    _code_probe[(triton.cdiv(q.numel(), BLOCK),)](q, codes, signed, q.numel(), BLOCK)
    expected = e2m1_codes_reference(q).to(torch.int32)
    expected[q.isinf()] = 7
    assert_bitwise_equal(codes, expected, f"E2M1 codes (seed {seed})")
    expected[1::2] += 8
    assert_bitwise_equal(signed, expected, f"E2M1 codes with the sign in the add (seed {seed})")


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


def scaled_to(w: torch.Tensor, amax: float) -> torch.Tensor:
    """``w`` rescaled (in float64) so that its amax is about ``amax`` (at most the dtype's largest value)."""
    amax = min(amax, torch.finfo(w.dtype).max)
    return (w.double() * (amax / w.double().abs().max())).to(w.dtype)


def near_midpoints(dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(rows, amax): weight_scale_2 = 2^-12, every block scale 15 (its first element is 6 * 15 * 2^-12),
    so d = 15 * 2^-12, whose reciprocal's rounding shows in fl(x * fl(1/d)) for most midpoints; the other
    elements are each E2M1 midpoint times d (exact ties) and its two neighbours in ``dtype``, both signs:
    quotients that a 1-ulp division error rounds the other way."""
    s2, scale = 2.0**-12, 15.0
    d = scale * s2
    mids = (torch.tensor(E2M1_BOUNDS, dtype=torch.float64) * d).to(dtype)
    bits = mids.view(torch.int16) if dtype != torch.float32 else mids.view(torch.int32)
    near = torch.cat([bits, bits + 1, bits - 1]).view(dtype)
    near = torch.cat([near, -near])
    rows = -(-len(near) // 15)
    body = torch.cat([near, torch.zeros(rows * 15 - len(near), dtype=dtype)]).reshape(rows, 15)
    first = torch.full((rows, 1), E2M1_MAX * d, dtype=dtype)
    return torch.cat([first, body], dim=1), NVFP4_SCALE_2_DIVISOR * s2


@pytest.mark.slow  # 20 s per dtype under the interpreter; the default tier grew past 3 min on 2 cores (12-07)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nvfp4_common_regime_boundaries_and_routing(gpu_path, monkeypatch, dtype):
    """amax at each bound of the common regime and one float32 step outside it, tensors of both kinds in
    one call, -0.0, zero blocks and saturated (overflowing) quotients in the common regime; then each
    launch alone: the COMMON launch must produce exactly the common-regime tensors, the general launch
    the others (so the regime split is exercised, not only the general path); then the general launch
    alone for all of them."""
    seed = 41
    lo, hi = COMMON_AMAX_MIN, nvfp4_module.COMMON_AMAX_MAX[dtype]
    below = torch.tensor(lo).nextafter(torch.tensor(0.0)).item()
    above = torch.tensor(hi).nextafter(torch.tensor(float("inf"))).item()
    edges = nvfp4_edges(dtype)
    edges_amax = edges.float().abs().max().item()
    mids, mid_amax = near_midpoints(dtype)
    wide = scaled_to(heavy((2, 1152), dtype, seed + 6), 3.0)
    zeros = scaled_to(heavy((2, 1088), dtype, seed + 7), 1.0)  # -0.0 and +0.0 in a common-regime tensor
    zeros[:, ::3] = -0.0
    zeros[:, 1::7] = 0.0
    cases = [  # (weight, amax given, in the common regime)
        (scaled_to(heavy((3, 48), dtype, seed), lo), lo, True),
        (scaled_to(heavy((3, 48), dtype, seed + 1), lo), below, False),
        (scaled_to(heavy((2, 64), dtype, seed + 2), hi), hi, True),
        (scaled_to(heavy((2, 64), dtype, seed + 3), hi), above, False),
        (heavy((4, 32), dtype, seed + 4), 1.0, True),  # clipped: most blocks saturate
        (mids, mid_amax, True),
        # K % 64 == 0 and long enough for the common launch's 4-block steps (scales as 32-bit words), then
        # a masked tail; and K % 64 != 0, which that launch quantizes one block per lane, scales as bytes
        (mids.reshape(1, -1).repeat(2, 24), mid_amax, True),
        (wide, wide.float().abs().max().item(), True),  # block scales that differ within each word
        (zeros, 1.0, True),
        (zeros[:, :1040], 1.0, True),  # the same, K % 64 != 0
        (heavy((2, 1040), dtype, seed + 5), 1.0, True),
        (edges, 1.0, True),  # -0.0, ties, zero blocks, the dtype's largest values (quotients overflow)
        (edges, edges_amax, lo <= edges_amax <= hi),
    ]
    weights = [w for w, _, _ in cases]
    given = torch.tensor([a for _, a, _ in cases], dtype=torch.float32)
    assert any(c for _, _, c in cases) and not all(c for _, _, c in cases)
    expected = [quantize_nvfp4_reference(w, a) for w, a in zip(weights, given)]
    for i, (r, e) in enumerate(zip(quantize_nvfp4(weights, given), expected)):
        assert_results_equal(r, e, f"both launches, weights[{i}] (amax {given[i].item()})")
        if given[i].to(dtype).float() == given[i]:  # ModelOpt holds amax in the weight's dtype
            assert_results_equal(r, nvfp4_export(weights[i], given[i]), f"modelopt weights[{i}]")
    # weights far above their given amax (bf16's and float32's largest against 1.0) are the common launch's to flag and
    # the general launch's to redo (without the redo the first check above fails: their quotients overflow
    # to NaN, whose sign bit is the hardware's); everything else is one launch's alone
    redone = [bool(w.float().abs().max() > a * 2.0**79) for w, a in zip(weights, given.tolist())]
    assert any(redone) == (dtype != torch.float16)  # float16 tops out at 65504
    for common in (True, False):
        monkeypatch.setattr(nvfp4_module, "nvfp4_launches", lambda hw, c=common: [("nvfp4", c)])
        results = quantize_nvfp4(weights, given)
        for i, (r, e) in enumerate(zip(results, expected)):
            if cases[i][2] == common and not redone[i]:
                assert_results_equal(r, e, f"{'common' if common else 'general'} launch alone, weights[{i}]")
    # the general launch stays exact for every tensor (an empty common regime sends all of them there)
    monkeypatch.setattr(nvfp4_module, "COMMON_AMAX_MAX", dict.fromkeys(nvfp4_module.COMMON_AMAX_MAX, 0.0))
    for i, (r, e) in enumerate(zip(quantize_nvfp4(weights, given), expected)):
        assert_results_equal(r, e, f"general launch for all, weights[{i}] (amax {given[i].item()})")

"""Exact float rounding in Triton: E4M3 and E2M1 encodings built from integer bit operations.

Why not ``x.to(tl.float8e4nv)``: the Triton interpreter converts float32 -> float8 wrongly (drops
the rounding carry, rounds ties up, overflows to NaN), and Hopper has no E2M1 convert at all.  Here
every rounding is round-half-to-even done on the float32 bit pattern, so the interpreter and the
GPU agree bit for bit with torch.  All divisions elsewhere use ``tl.div_rn`` for the same reason, or
``divide_by_constant`` where torch itself divides by a Python number.
"""

import triton
import triton.language as tl

from .formats import E2M1_BOUNDS, E4M3_MAX

_E4M3_MAX = tl.constexpr(E4M3_MAX)
_E4M3_MIN_NORMAL = tl.constexpr(2.0**-6)
_E4M3_SUBNORMAL_STEPS = tl.constexpr(2.0**9)  # subnormal E4M3 values are k * 2^-9
_FP16_MIN_NORMAL = tl.constexpr(2.0**-14)
_FP16_SUBNORMAL_STEPS = tl.constexpr(2.0**24)
_B0 = tl.constexpr(E2M1_BOUNDS[0])
_B1 = tl.constexpr(E2M1_BOUNDS[1])
_B2 = tl.constexpr(E2M1_BOUNDS[2])
_B3 = tl.constexpr(E2M1_BOUNDS[3])
_B4 = tl.constexpr(E2M1_BOUNDS[4])
_B5 = tl.constexpr(E2M1_BOUNDS[5])
_B6 = tl.constexpr(E2M1_BOUNDS[6])


@triton.jit
def round_mantissa(a, DROP: tl.constexpr, MIN_NORMAL: tl.constexpr, SUBNORMAL_STEPS: tl.constexpr):
    """Round float32 ``a >= 0`` (finite) to a format with 23 - DROP mantissa bits, half to even.

    Below MIN_NORMAL the target format is subnormal with spacing 1 / SUBNORMAL_STEPS; MIN_NORMAL = 0
    means the target shares float32's exponent range (bfloat16), where bit rounding is exact everywhere.
    """
    bits = a.to(tl.int32, bitcast=True)
    low = (1 << DROP) - 1
    rounded = (bits + (low >> 1) + ((bits >> DROP) & 1)) & ~low
    result = rounded.to(tl.float32, bitcast=True)
    if MIN_NORMAL > 0:
        t = tl.where(a < MIN_NORMAL, a, 0.0) * SUBNORMAL_STEPS  # exact: a power-of-two scaling
        whole = t.to(tl.int32)  # truncation; t >= 0
        frac = t - whole.to(tl.float32)
        up = (frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))
        sub = (whole + up.to(tl.int32)).to(tl.float32) * (1.0 / SUBNORMAL_STEPS)
        result = tl.where(a < MIN_NORMAL, sub, result)
    return result


@triton.jit
def with_sign_of(magnitude, x):
    """``magnitude`` (>= 0, or +0.0) with the sign bit of ``x``: -0.0 and NaN signs kept, one bit OR."""
    sign = x.to(tl.int32, bitcast=True) & (-(1 << 31))
    return (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def round_to_dtype(x, KIND: tl.constexpr, HW: tl.constexpr):
    """Round float32 ``x`` onto the grid of KIND (0: float32, 1: bfloat16, 2: float16), keeping it float32.

    This reproduces torch keeping a quotient in the weight's dtype before a second cast.  HW: the GPU's
    round-to-nearest-even conversions (cvt.rn.bf16.f32 / cvt.rn.f16.f32) and back.
    """
    if KIND == 0:
        return x
    if HW:
        if KIND == 1:
            return x.to(tl.bfloat16).to(tl.float32)
        return x.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    a = tl.abs(x)
    special = (a != a) | (a == float("inf"))  # NaN and inf pass through unchanged
    a = tl.where(special, 0.0, a)
    if KIND == 1:
        r = round_mantissa(a, 16, 0.0, 1.0)
    else:
        r = round_mantissa(a, 13, _FP16_MIN_NORMAL, _FP16_SUBNORMAL_STEPS)
    return tl.where(special, x, with_sign_of(r, x))


@triton.jit
def e4m3_round(v):
    """float32 -> nearest float8_e4m3fn value as float32: half to even, saturating at 448, sign and NaN kept."""
    a = tl.abs(v)
    nan = a != a
    a = tl.where(nan | (a > _E4M3_MAX), tl.where(nan, 0.0, _E4M3_MAX), a)
    r = round_mantissa(a, 20, _E4M3_MIN_NORMAL, _E4M3_SUBNORMAL_STEPS)
    return tl.where(nan, v, with_sign_of(r, v))


@triton.jit
def e4m3_bits(r):
    """Byte pattern of ``r``, a float32 already on the E4M3 grid (see ``e4m3_round``); NaN -> 0x7F | sign."""
    bits = r.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(r)
    normal = ((a.to(tl.int32, bitcast=True) >> 20) - (120 << 3)) & 0x7F  # rebias exponent 127 -> 7
    subnormal = (a * _E4M3_SUBNORMAL_STEPS).to(tl.int32)
    magnitude = tl.where(a < _E4M3_MIN_NORMAL, subnormal, normal)
    magnitude = tl.where(a != a, 0x7F, magnitude)
    return (magnitude | sign).to(tl.uint8)


@triton.jit
def e2m1_code(x):
    """4-bit E2M1 code of float32 ``x``: nearest of {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even, saturating.

    Bit 3 is set for x < 0 (so -0.0 gives 0x0 and a tiny negative gives 0x8); NaN gives 7, as
    ModelOpt's searchsorted does.
    """
    m = tl.abs(x)
    code = (
        (m > _B0).to(tl.int32)
        + (m >= _B1).to(tl.int32)
        + (m > _B2).to(tl.int32)
        + (m >= _B3).to(tl.int32)
        + (m > _B4).to(tl.int32)
        + (m >= _B5).to(tl.int32)
        + (m > _B6).to(tl.int32)
    )
    code = tl.where(m != m, 7, code)
    return tl.where(x < 0, code | 8, code)


@triton.jit
def divisor_parts(d):
    """(-S, D, -I) with d = D / S exactly (S a power of two; D in [1, 2) for a normal d, D < 1 for a
    subnormal one) and I = fl32(1 / D): the per-divisor half of ``quotient``, once per tensor, row or
    block.  Scaling by S keeps every intermediate of ``quotient`` normal where its result matters;
    the signs are negative so that no instruction of the per-element half negates anything."""
    e = (d.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent
    s_bits = tl.where(e == 0, 254 << 23, tl.where(e == 254, 1 << 22, (254 - e) << 23))  # 2^127, 2^-127, 2^(127-e)
    S = s_bits.to(tl.float32, bitcast=True)
    D = d * S
    return -S, D, -tl.div_rn(1.0, D)


@triton.jit
def quotient(minus_n, D, minus_I):  # noqa: N803 - D and I as in the docstring
    """fl32(n / D) for n >= 0, given -n and -I = -fl32(1 / D), without a division (n = a * S for a
    quotient a / d, see ``divisor_parts``).

    The product y = n * I by the correctly rounded reciprocal is within an ulp; the FMA residual
    n - y*D is exact and one more FMA rounds y + residual * I once (Markstein).  Exact (bit for bit
    with IEEE division) wherever the quotient lies in [2^-100, 2^100]; below, where the residual can be
    subnormal, the result stays below 2^-99 (all the kernels need: FP8 bytes are 0 below 2^-10, E2M1
    codes 0 below 0.25, block scales clamp at 2^-9); where it overflows, inf or NaN.
    tests/test_exact_division.py checks this over every bf16 and fp16 mantissa against every divisor
    mantissa the kernels can form, and the extreme exponents.  Needs IEEE fma: the GPU's fma.rn.f32
    (the Triton interpreter's fma rounds twice).
    """
    y = minus_n * minus_I
    minus_residual = tl.fma(y, D, minus_n)  # y*D - n, exact
    return tl.fma(minus_residual, minus_I, y)


@triton.jit
def common_quotient(x, minus_d, J):  # noqa: N803 - J as in the docstring
    """fl32(x / d) given -d and J = fl32(1 / d), for a divisor whose range makes a prescale unnecessary
    (NVFP4's common regime, d in [2^-85, 2^14]): y = x * J within an ulp, the FMA residual x - y*d exact,
    one more FMA rounds once (Markstein); -d comes negated (once per divisor) so that nothing is negated
    per element.
    Exact wherever the intermediates are normal, i.e. for quotients the codes depend on; elsewhere a
    tiny quotient stays tiny and an overflowing one is inf or NaN (E2M1 and E4M3 saturate both: PTX
    min.f32 returns the non-NaN operand).  Both zeros give +0.0 (the residual's exact zero sum is +0
    under round-to-nearest, and so is the last one): where no non-zero quotient underflows, the result's
    sign bit is x < 0, -0.0 excluded, with nothing compared.  tests/test_exact_division.py proves it over
    every bf16 and fp16 value against the regime's divisors."""
    y = x * J
    residual = tl.fma(y, minus_d, x)  # x - y*d, exact
    return tl.fma(residual, J, y)


@triton.jit
def approximate_reciprocal(d):
    """PTX ``rcp.approx.ftz.f32``: 1/d within about an ulp, one MUFU.RCP (tests/ptx_semantics.py has a
    stand-in that errs by up to an ulp either way)."""
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def refine_reciprocal(d, r):
    """fl32(1/d) from r a few ulps off it, for d and 1/d normal, without div.rn's special-case branch:
    two Newton steps r + r*(1 - d*r) (FMAs) land on fl32(1/d) for every mantissa but 2 - 2^-23, where 1/d
    lies just above a midpoint and the last step may stop on the tie one ulp low, at a power of two: its
    correct reciprocal is that power of two with the last mantissa bit set, so the bit is set.
    tests/test_exact_division.py checks every mantissa with r = fl32(1/d) + k ulps, k in 0, +-1, +-2, +-3,
    +-4, +-16, +-64."""
    r = tl.fma(r, tl.fma(-d, r, 1.0), r)
    r = tl.fma(r, tl.fma(-d, r, 1.0), r)
    ones = (d.to(tl.int32, bitcast=True) & 0x7FFFFF) == 0x7FFFFF
    return tl.where(ones, (r.to(tl.int32, bitcast=True) | 1).to(tl.float32, bitcast=True), r)


@triton.jit
def e2m1_magnitude_code(q):
    """E2M1 code (0..7) of float32 q >= 0 (or NaN -> 7): round half to even onto {0, .5, 1, 1.5, 2, 3,
    4, 6}, saturating, with one float add doing the rounding.

    The grid spacing is 0.5 below 2, 1 in [2, 4), 2 from 4: adding C = 2^22, 2^23 or 2^24 (by q's
    binade) makes float32 addition round q to exactly that spacing, ties to even (the sum's last
    mantissa bit has the parity of the code).  The code is then the sum's bits minus C's bits, plus 0,
    2 or 4 for the binade.  min(q, 6) first sends NaN and everything above 6 to code 7 (PTX min.f32
    returns the non-NaN operand).
    """
    return e2m1_biased_code(q) - E2M1_CODE_BIAS


E2M1_CODE_BIAS = tl.constexpr(0x4A800000 >> 22)
"""What ``e2m1_biased_code`` adds to the code (the bits of 2^22 >> 22)."""


@triton.jit
def e2m1_biased_code(q):
    """``e2m1_magnitude_code(q) + E2M1_CODE_BIAS`` (see there), without the constant: a caller that
    packs codes into a word subtracts the bias once per word (integer addition is linear mod 2^32),
    and its three-input add is then free for another term (NVFP4's sign)."""
    q, c = _e2m1_adder(q)
    t = (q + c.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
    return t - c + (c >> 22)


@triton.jit
def e2m1_biased_signed_code(q, sign):
    """``e2m1_biased_code(q) + sign``, sign 8 (bit 3 of a code: negative) or 0, riding in the rounding
    add: C + 8 ulps (the bits of C | 8; C's mantissa bits are 0) rounds q exactly as C does (a multiple
    of C's ulp, same binade, same last-bit parity), so the sum's bits are 8 higher; C itself leaves."""
    q, c = _e2m1_adder(q)
    t = (q + (c | sign).to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
    return t - c + (c >> 22)


@triton.jit
def sign_bit_as_8(x):
    """8 where float32 x has its sign bit set, else 0 (one shift and one AND, fused into an OR by the caller)."""
    return (x.to(tl.int32, bitcast=True) >> 28) & 8


@triton.jit
def _e2m1_adder(q):
    """(min(q, 6), the bits of C = 2^(22 + binade) >= 2^22): the rounding add's operands (see
    ``e2m1_magnitude_code``)."""
    q = tl.minimum(q, 6.0)
    qb = q.to(tl.int32, bitcast=True)
    return q, tl.maximum((qb & 0x7F800000) + (22 << 23), 0x4A800000)


@triton.jit
def divide_by_constant(x, C: tl.constexpr, INV_C: tl.constexpr, RECIPROCAL: tl.constexpr):
    """``x / C`` exactly as torch evaluates ``tensor / C`` on the device (see grouping.divides_by_reciprocal)."""
    if RECIPROCAL:
        return x * INV_C
    return tl.div_rn(x, C)

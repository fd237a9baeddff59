"""The compiled C loop (kernels/native.py, nvfp4_cpu.c) for every format and every source, bit for bit.

- FP8 per tensor / per channel and FP8-block outputs from 16/32-bit weights == the torch references
  (themselves tested against ModelOpt) and ModelOpt's own export functions, exhaustively over every
  finite bf16 and fp16 value, and on random ragged inputs.
- FP8-block sources (FP8BlockSource) read fused == dequantize (DeepSeek's weight_dequant, the torch
  reference) then quantize, byte for byte, for amax, NVFP4, FP8 (both) and FP8-block: every e4m3 code
  under a sweep of block scales (normal, subnormal, powers of two, the largest float32, overflowing
  bf16), ragged edge blocks, strided code views; NaN/Inf found and named as the references find them.
Seeds are fixed where printed in the test id, or the run's seed (tests/seeds.py) named in the assertion message.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from moeq_triton.kernels import (
    FP8BlockSource,
    NonFiniteWeightError,
    dequantize_fp8_block_reference,
    grouped_amax,
    grouped_amax_reference,
    native,
    quantize_fp8,
    quantize_fp8_block,
    quantize_fp8_block_reference,
    quantize_fp8_reference,
    quantize_nvfp4,
    quantize_nvfp4_reference,
)
from moeq_triton.kernels.formats import E4M3_MAX, FP8_BLOCK_SIZE
from moeq_triton.modelopt.oracle import fp8_channel_export, fp8_export
from tests.assertions import assert_bitwise_equal, assert_results_equal
from tests.kernels.test_fp8_block import modelopt_fp8_block
from tests.seeds import SEED

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FLOAT32_MAX = torch.finfo(torch.float32).max


@pytest.fixture(autouse=True)
def native_engine(monkeypatch):
    """Every test here runs the C loop (no interpreter); without a compiler that is a failure, not a skip."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MOEQ_TRITON_NATIVE", "1")
    assert native.library() is not None, "no C compiler here: the fast path would silently be the reference"


def run_seed() -> int:
    """The run's fixed seed (tests/seeds.py; named in the assertion messages and beside every failure)."""
    return SEED


def every_finite(dtype: torch.dtype, k: int = 256) -> torch.Tensor:
    """Every finite value of a 16-bit dtype (both zeros, subnormals, the max), as [rows, k]."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = bits[torch.isfinite(bits.float())]
    pad = -len(values) % k
    return torch.cat([values, values[:pad]]).reshape(-1, k)


def heavy_tailed(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen) ** 3
    w[..., torch.randint(0, shape[-1], (max(1, shape[-1] // 32),), generator=gen)] *= 40.0
    return w.to(dtype)


def ragged(seed: int, dtype) -> list[torch.Tensor]:
    """Shapes on both sides of the 16 and 128 boundaries, a 3-D one and a row-strided view."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 16), (3, 32), (127, 144), (129, 112), (200, 272), (2, 17, 48)]
    out = [heavy_tailed(s, dtype, gen) for s in shapes]
    out.append(heavy_tailed((40, 96), dtype, gen)[:, 16:80])
    return out


# ---------------------------------------------------------------------------- FP8 from 16/32-bit weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_every_16_bit_value(dtype):
    """Every finite bf16/fp16 value, per tensor under amaxes that put the quotients on E4M3's ties,
    subnormals and saturation (the quotient rounded to the dtype first, as torch does), and per channel."""
    w = every_finite(dtype)
    true = grouped_amax_reference([w])[0]
    for amax in (true, torch.tensor(448.0), torch.tensor(1.0), torch.tensor(3.0e-3), torch.tensor(0.0), true / 8):
        (ours,) = quantize_fp8([w], amax.reshape(1))
        assert_results_equal(ours, quantize_fp8_reference(w, amax), f"{dtype} amax {amax.item()}")
    rows = w.float().abs().amax(-1)
    for row_amax in (rows, rows * 0.25, torch.zeros_like(rows)):
        (ours,) = quantize_fp8([w], [row_amax], per_channel=True)
        assert_results_equal(ours, quantize_fp8_reference(w, row_amax, per_channel=True), f"{dtype} per channel")
    (ours,) = quantize_fp8([w], per_channel=True)
    assert_results_equal(ours, quantize_fp8_reference(w, rows, per_channel=True), f"{dtype} own row amaxes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nvfp4_every_16_bit_value(dtype):
    """Every finite bf16/fp16 value, in sorted blocks (the block scales sweep E4M3's subnormals, ties and
    saturation) and shuffled (mixed magnitudes per block), under amaxes from the tensor's own to ones that
    clamp the scales to E4M3's smallest subnormal or its max, and amax 0 (scale_2 0: NaN scales, as ModelOpt)."""
    w = every_finite(dtype)
    shuffled = w.reshape(-1)[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(7))].reshape(w.shape)
    true = grouped_amax_reference([w])[0]
    for weight in (w, shuffled):
        for amax in (true, true / 8, torch.tensor(FLOAT32_MAX), torch.tensor(1e-3), torch.tensor(0.0)):
            (ours,) = quantize_nvfp4([weight], amax.reshape(1))
            where = f"{dtype} amax {amax.item()} {'shuffled' if weight is shuffled else 'sorted'}"
            assert_results_equal(ours, quantize_nvfp4_reference(weight, amax), where)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_matches_reference_and_modelopt(dtype):
    """Random ragged weights: per tensor (own and clipped amax) and per channel == reference == ModelOpt."""
    seed = run_seed()
    weights = ragged(seed, dtype)
    amax = grouped_amax_reference(weights)
    assert_bitwise_equal(grouped_amax(weights), amax, f"amax seed={seed}")
    clipped = amax.clone()
    clipped[1] /= 8
    for weight_amax in (None, clipped):
        given = amax if weight_amax is None else weight_amax
        for i, (w, r) in enumerate(zip(weights, quantize_fp8(weights, weight_amax))):
            where = f"seed={seed} weights[{i}] {tuple(w.shape)}"
            assert_results_equal(r, quantize_fp8_reference(w, given[i]), f"reference {where}")
            flat = r._replace(weight=r.weight.reshape(-1, w.shape[-1]))  # ModelOpt treats N-D as its 2-D view
            assert_results_equal(flat, fp8_export(w.reshape(-1, w.shape[-1]), given[i]), f"modelopt {where}")
    for i, (w, r) in enumerate(zip(weights, quantize_fp8(weights, per_channel=True))):
        rows = w.abs().amax(-1).float()
        where = f"seed={seed} weights[{i}] {tuple(w.shape)} per channel"
        assert_results_equal(r, quantize_fp8_reference(w, rows, per_channel=True), f"reference {where}")
        if w.dim() == 2 and w.shape[0] > 1:  # ModelOpt's exporter squeezes a one-row scale to 0-dim and fails
            assert_results_equal(r, fp8_channel_export(w, rows), f"modelopt {where}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_block_matches_reference_and_modelopt(dtype):
    """Random ragged 2-D weights (partial edge blocks, a strided view, an all-zero block, the dtype's
    subnormals) == reference == ModelOpt's FP8_PB_WO export chain."""
    seed = run_seed()
    weights = [w for w in ragged(seed, dtype) if w.dim() == 2]
    quiet = heavy_tailed((260, 130), dtype, torch.Generator().manual_seed(seed + 1))
    quiet[:128, :128] = 0  # amax 0 -> scale 1
    quiet[128:256] *= torch.finfo(dtype).tiny  # block amaxes at the clamp
    weights.append(quiet)
    for i, (w, r) in enumerate(zip(weights, quantize_fp8_block(weights))):
        where = f"seed={seed} weights[{i}] {tuple(w.shape)}"
        assert_results_equal(r, quantize_fp8_block_reference(w), f"reference {where}")
        assert_results_equal(r, modelopt_fp8_block(w.contiguous()), f"modelopt {where}")


def test_fp8_block_every_bf16_value():
    """Every finite bf16 value in [N, 256] rows: each 128x128 block spans many binades."""
    w = every_finite(torch.bfloat16)
    (ours,) = quantize_fp8_block([w])
    assert_results_equal(ours, quantize_fp8_block_reference(w), "every bf16 value")


# ---------------------------------------------------------------------------- FP8-block sources


SCALES = [
    1.0, 0.5, 2.0**-10, 2.0**10, 2.0**-126, 2.0**100, 2.0**-133,  # powers of two (one subnormal)
    1.2345e-3, 7.0e-4, 3.3e-2, 0.1, 9.7, 1.0e30,  # normal
    1.0e-39, 2.0**-149, 1.1754942e-38,  # float32 subnormals (the last just below the smallest normal)
    3.0e36, 7.6e35, 1.0e38, FLOAT32_MAX,  # products overflow bf16 or float32 for large codes
    0.0, -0.75,  # not what checkpoints hold, but defined: zero and negative multipliers
]  # fmt: skip


def all_codes_source(scale: float, shape=(128, 128), finite: bool = True) -> FP8BlockSource:
    """Every e4m3 code (the two NaN codes only when not ``finite``) cycled over ``shape``, one scale."""
    codes = torch.arange(256, dtype=torch.int32)
    if finite:
        codes = codes[(codes & 0x7F) != 0x7F]
    n = math.prod(shape)
    codes = codes.repeat(-(-n // len(codes)))[:n].to(torch.uint8).reshape(shape)
    blocks = (-(-shape[0] // FP8_BLOCK_SIZE), -(-shape[1] // FP8_BLOCK_SIZE))
    return FP8BlockSource(codes.view(torch.float8_e4m3fn), torch.full(blocks, scale, dtype=torch.float32))


def random_source(shape, gen: torch.Generator, *, scale_dtype=torch.float32) -> FP8BlockSource:
    """Random finite codes and block scales of a few binades (DeepSeek's are amax / 448)."""
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32)
    codes = torch.where((codes & 0x7F) == 0x7F, codes - 1, codes).to(torch.uint8)
    blocks = (-(-shape[0] // FP8_BLOCK_SIZE), -(-shape[1] // FP8_BLOCK_SIZE))
    scale = (2.0 ** torch.randint(-14, -4, blocks, generator=gen)) * (1 + torch.rand(blocks, generator=gen))
    return FP8BlockSource(codes.view(torch.float8_e4m3fn), scale.to(scale_dtype))


def outcome(fn, *args):
    """The call's result, or the NonFiniteWeightError's index (both routes must agree on either)."""
    try:
        return fn(*args)
    except NonFiniteWeightError as error:
        return ("nonfinite", error.index)


def assert_same_outcome(ours, theirs, where: str) -> None:
    if isinstance(theirs, tuple) and theirs and theirs[0] == "nonfinite":
        assert ours == theirs, f"{where}: the dequantized route raised for weights[{theirs[1]}], ours gave {ours}"
        return
    assert not (isinstance(ours, tuple) and ours and ours[0] == "nonfinite"), f"{where}: ours raised {ours}"
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_results_equal(a, b, f"{where} weights[{i}]")


def assert_fused_equals_dequantized(sources: list[FP8BlockSource], where: str) -> None:
    """amax, NVFP4 (K a multiple of 16 only), FP8 per tensor / per channel and FP8-block: the fused read
    of each source == the torch references on ``dequantize_fp8_block_reference`` of it, byte for byte;
    a source whose values hold NaN/Inf is refused by both routes, named by its index."""
    bf16 = [dequantize_fp8_block_reference(s.codes, s.scale_inv) for s in sources]
    amax = grouped_amax_reference(bf16)
    assert_bitwise_equal(native.amax(sources), amax, f"{where}: amax")
    finite = [bool(torch.isfinite(w).all()) for w in bf16]
    first_bad = ("nonfinite", finite.index(False)) if not all(finite) else None

    def references(quantize):
        return first_bad or [quantize(w, a) for w, a in zip(bf16, amax)]

    if all(s.shape[-1] % 16 == 0 for s in sources):
        assert_same_outcome(outcome(quantize_nvfp4, sources), references(quantize_nvfp4_reference), f"{where}: nvfp4")
    assert_same_outcome(outcome(quantize_fp8, sources), references(quantize_fp8_reference), f"{where}: fp8")
    assert_same_outcome(
        outcome(quantize_fp8, sources, None, True),
        references(lambda w, _: quantize_fp8_reference(w, w.abs().amax(-1).float(), per_channel=True)),
        f"{where}: fp8 per channel",
    )
    assert_same_outcome(
        outcome(quantize_fp8_block, sources),
        references(lambda w, _: quantize_fp8_block_reference(w)),
        f"{where}: fp8-block",
    )


@pytest.mark.parametrize("scale", SCALES, ids=[f"{s:.4g}" for s in SCALES])
def test_source_every_code_under_each_scale(scale):
    """All 254 finite e4m3 codes in one 128x128 block under one scale, every output format: exhaustive
    over codes x the sweep.  Scales whose products overflow are refused by both routes."""
    assert_fused_equals_dequantized([all_codes_source(scale)], f"scale {scale!r}")


def test_source_every_code_with_scales_mixed_in_one_tensor():
    """The same codes with a different scale in each block of one tensor (so the tensor amax, per-channel
    row amaxes and per-strip tables mix scales), ragged at both edges."""
    gen = torch.Generator().manual_seed(25)
    source = all_codes_source(1.0, shape=(300, 400))
    normal = [s for s in SCALES if 0 < s < 1e30]
    scale = torch.tensor(normal)[torch.randint(0, len(normal), source.scale_inv.shape, generator=gen)]
    assert_fused_equals_dequantized([FP8BlockSource(source.codes, scale)], "mixed scales, seed 25")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_source_ragged_random(seed):
    """Random codes and scales on shapes on both sides of 128 (fixed seeds 1-3), a row-strided view of the
    codes, a bf16 scale_inv tensor; K multiples of 16 so that NVFP4 is covered too."""
    gen = torch.Generator().manual_seed(seed)
    sources = [random_source(s, gen) for s in [(1, 16), (127, 144), (129, 112), (200, 272), (256, 128)]]
    wide = random_source((130, 400), gen)
    sources.append(FP8BlockSource(wide.codes[:, :272], wide.scale_inv[:, :3].contiguous()))
    sources.append(random_source((64, 48), gen, scale_dtype=torch.bfloat16))
    assert_fused_equals_dequantized(sources, f"seed {seed}")


def test_source_random_shapes():
    seed = run_seed()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    shapes = [(rng.randint(1, 300), 16 * rng.randint(1, 24)) for _ in range(6)]
    assert_fused_equals_dequantized([random_source(s, gen) for s in shapes], f"seed={seed} shapes {shapes}")


def test_source_beside_tensors_in_one_call():
    """Sources and bf16/fp16/fp32 tensors in one list: each result as if passed alone; given amaxes."""
    gen = torch.Generator().manual_seed(7)
    source = random_source((130, 144), gen)
    weights = [heavy_tailed((9, 144), torch.float16, gen), source, heavy_tailed((5, 32), torch.float32, gen)]
    dense = [weights[0], dequantize_fp8_block_reference(source.codes, source.scale_inv), weights[2]]
    amax = grouped_amax_reference(dense)
    assert_bitwise_equal(grouped_amax(weights), amax, "amax")
    shared = amax.max().repeat(3)  # a scale group's amax
    for ours, w in zip(quantize_nvfp4(weights, shared), dense):
        assert_results_equal(ours, quantize_nvfp4_reference(w, shared[0]), "nvfp4, shared amax")
    for ours, w in zip(quantize_fp8(weights, shared), dense):
        assert_results_equal(ours, quantize_fp8_reference(w, shared[0]), "fp8, shared amax")
    rows = [w.abs().amax(-1).float() * 0.5 for w in dense]
    for ours, w, r in zip(quantize_fp8(weights, rows, per_channel=True), dense, rows):
        assert_results_equal(ours, quantize_fp8_reference(w, r, per_channel=True), "fp8 per channel, given")


def test_source_nan_code_is_named():
    """A NaN code (0x7F or 0xFF) makes the values NaN: every function names that weight."""
    gen = torch.Generator().manual_seed(5)
    sources = [random_source((20, 32), gen) for _ in range(3)]
    sources[2].codes.view(torch.uint8)[7, 9] = 0xFF
    message = r"weights\[2\] \(FP8-block source, shape \(20, 32\), torch.float8_e4m3fn\) contains NaN or Inf"
    for call in (
        lambda: grouped_amax(sources),
        lambda: quantize_nvfp4(sources),
        lambda: quantize_nvfp4(sources, torch.ones(3)),
        lambda: quantize_fp8(sources),
        lambda: quantize_fp8(sources, torch.ones(3)),
        lambda: quantize_fp8(sources, per_channel=True),
        lambda: quantize_fp8_block(sources),
    ):
        with pytest.raises(NonFiniteWeightError, match=message):
            call()


def test_source_layout_errors_name_the_weight():
    gen = torch.Generator().manual_seed(6)
    good = random_source((20, 32), gen)
    with pytest.raises(ValueError, match=r"weights\[1\].*expected a float tensor of shape \(1, 1\)"):
        quantize_fp8([good, FP8BlockSource(good.codes, torch.ones(2, 1))])
    with pytest.raises(ValueError, match=r"weights\[0\].*2-D float8_e4m3fn"):
        grouped_amax([FP8BlockSource(good.codes.view(torch.uint8), good.scale_inv)])
    with pytest.raises(ValueError, match=r"weights\[0\].*not a multiple of the block size 16"):
        quantize_nvfp4([random_source((4, 40), gen)])


def test_e4m3_saturates_like_torch():
    """Quotients at and beyond the top of E4M3 (448, the 464 tie, 1e30, float32's max) and -0.0 give the
    bytes torch's CPU cast gives (it saturates; inf too, checked here on torch itself)."""
    assert torch.tensor([float("inf")]).to(torch.float8_e4m3fn).view(torch.uint8).item() == 0x7E
    w = torch.tensor([[448.0, 460.0, 464.0, 465.0, 1e30, FLOAT32_MAX, -500.0, -0.0] * 2])
    (ours,) = quantize_fp8([w], torch.tensor([E4M3_MAX]))
    assert_bitwise_equal(ours.weight, w.to(torch.float8_e4m3fn), "saturation")
    assert ours.weight.view(torch.uint8)[0, :8].tolist() == [0x7E] * 6 + [0xFE, 0x80]

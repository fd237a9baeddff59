"""Kernels (Triton interpreter) vs torch references vs ModelOpt's own export functions, bit for bit."""

from __future__ import annotations

import random

import pytest
import torch

from moeq_triton.kernels import (
    FP8Weight,
    dequantize_nvfp4_reference,
    grouped_amax,
    grouped_amax_reference,
    launch_counts,
    native,
    quantize_fp8,
    quantize_fp8_reference,
    quantize_nvfp4,
    quantize_nvfp4_reference,
    reset_launch_counts,
)
from moeq_triton.kernels import fp8 as fp8_module
from moeq_triton.kernels import nvfp4 as nvfp4_module
from moeq_triton.kernels.formats import (
    E2M1_BOUNDS,
    E2M1_VALUES,
    E4M3_MAX,
    NVFP4_SCALE_2_DIVISOR,
    float32_reciprocal,
)
from moeq_triton.modelopt.oracle import fp8_channel_export, fp8_export, nvfp4_export, nvfp4_self
from moeq_triton.testing import MODEL_SHAPES
from tests.assertions import assert_bitwise_equal, assert_results_equal
from tests.device import TEST_DEVICE
from tests.seeds import SEED

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def nvfp4_launches_per_dtype() -> dict[str, int]:
    """NVFP4's launches for one dtype on TEST_DEVICE: one in the interpreter; on the GPU path the
    common-regime launch and the general one (nvfp4.nvfp4_launches)."""
    return {name: 1 for name, _ in nvfp4_module.nvfp4_launches(nvfp4_module.hardware_math(TEST_DEVICE))}


def heavy_tailed(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Cubed normals with a few outlier columns: the block scales then span many E4M3 binades."""
    w = torch.randn(shape, generator=gen) ** 3
    if shape[-1] >= 16:
        cols = torch.randint(0, shape[-1], (max(1, shape[-1] // 32),), generator=gen)
        w[..., cols] *= 40.0
    return w.to(dtype).to(TEST_DEVICE)


def mixed_list(n: int, dtype, seed: int, max_k: int = 320) -> list[torch.Tensor]:
    """n tensors of ragged shapes (odd row counts, K from 16 to max_k), some 3-D."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = 16 * rng.randint(1, max_k // 16)
        rows = rng.choice([1, 3, 7, 17, 33, 65])
        shape = (2, rows, k) if i % 5 == 4 else (rows, k)
        out.append(heavy_tailed(shape, dtype, gen))
    return out


def run_seed() -> int:
    """The run's fixed seed (tests/seeds.py; named in the assertion messages and beside every failure)."""
    return SEED


# ---------------------------------------------------------------- amax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 8, 64, pytest.param(300, marks=pytest.mark.slow)])
def test_grouped_amax_matches_reference(dtype, n):
    """A mis-indexed tensor or a dropped tile must not survive: every tensor has its own magnitude."""
    seed = run_seed()
    weights = mixed_list(n, dtype, seed, max_k=96 if n == 300 else 320)
    for i, w in enumerate(weights):
        w.mul_(1 + i % 7)
    assert_bitwise_equal(grouped_amax(weights), grouped_amax_reference(weights), f"amax seed={seed}")


def test_amax_of_views_without_copies():
    """Views of a stacked (E, N, K) parameter and column slices of a TP split (row stride > K) read the right rows."""
    gen = torch.Generator().manual_seed(1)
    stacked = heavy_tailed((6, 19, 64), torch.bfloat16, gen)
    views = [stacked[e] for e in range(6)] + [stacked[2, :, 16:48], stacked[3, 5:11, :32]]
    assert_bitwise_equal(grouped_amax(views), grouped_amax_reference(views), "amax of views")


# ---------------------------------------------------------------- NVFP4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 8, pytest.param(64, marks=pytest.mark.slow)])  # 64: 30-40 s interpreted
def test_nvfp4_matches_reference_and_modelopt(dtype, n):
    seed = run_seed()
    weights = mixed_list(n, dtype, seed)
    amax = grouped_amax_reference(weights)
    results = quantize_nvfp4(weights)
    for i, (w, r) in enumerate(zip(weights, results)):
        where = f"seed={seed} weights[{i}] {tuple(w.shape)}"
        assert_results_equal(r, quantize_nvfp4_reference(w, amax[i]), f"reference {where}")
        assert_results_equal(r, nvfp4_export(w, amax[i]), f"modelopt export {where}")
        assert_results_equal(r, nvfp4_self(w), f"NVFP4QTensor.quantize {where}")


@pytest.mark.slow  # about 190 s in the interpreter; test_one_launch_per_dtype keeps the claim in the default tier
def test_nvfp4_300_tensors_one_launch_per_dtype():
    """300 ragged tensors in two dtypes: two launches, every output still exact."""
    seed = run_seed()
    weights = mixed_list(150, torch.bfloat16, seed, max_k=64) + mixed_list(150, torch.float32, seed + 1, max_k=64)
    reset_launch_counts()
    results = quantize_nvfp4(weights)
    assert launch_counts() == {"amax": 2, **{name: 2 * n for name, n in nvfp4_launches_per_dtype().items()}}
    amax = grouped_amax_reference(weights)
    for i, (w, r) in enumerate(zip(weights, results)):
        assert_results_equal(r, quantize_nvfp4_reference(w, amax[i]), f"seed={seed} weights[{i}]")


def crafted_nvfp4_weight(dtype) -> torch.Tensor:
    """Rows built so that block scale and weight_scale_2 are exact and x hits chosen values.

    amax = 2688 makes weight_scale_2 = 1; a block whose max is 6 then has scale 1 and x = w.
    """
    ties = [b for b in E2M1_BOUNDS] + [-b for b in E2M1_BOUNDS]  # every E2M1 midpoint, both signs
    grid = list(E2M1_VALUES)
    rows = [
        [2688.0] + [0.0] * 15,  # the tensor amax; scale 448 exactly
        [6.0] + ties + [0.0] * (15 - len(ties)),  # exact ties, scale 1
        [6.0] + grid + [-v for v in grid[1:]],  # exact grid values
        [6.0, -0.0, -1e-3, 1e-3, -0.2, 0.2, -0.0, 0.0] + [0.1] * 8,  # -0.0 and small negatives
        [0.0] * 16,  # all-zero block: scale stored as 1.0
        [6.0 * 2.0**-12] * 16,  # block scale 2^-12: clamped up to 2^-9
        [6.0 * 2.0**-10, -(2.0**-12)] + [2.0**-13] * 14,  # subnormal E4M3 scales
        [6.0 * 1.0625] + [5.99] * 15,  # scale between E4M3 values: rounds, then x saturates
    ]
    return torch.tensor(rows, dtype=torch.float32).to(dtype).to(TEST_DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_crafted_edges(dtype):
    """Ties to even, -0.0 vs small negatives, zero blocks, the 2^-9 clamp, subnormal scales."""
    w = crafted_nvfp4_weight(dtype)
    amax = grouped_amax_reference([w])
    (r,) = quantize_nvfp4([w])
    assert_results_equal(r, quantize_nvfp4_reference(w, amax[0]), "reference")
    assert_results_equal(r, nvfp4_export(w, amax[0]), "modelopt")
    codes = torch.stack([r.weight & 0xF, r.weight >> 4], -1).flatten(-2)
    # Ties: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (codes 0,2,2,4,4,6,6), sign bit 8.
    assert codes[1, 1:8].tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert codes[1, 8:15].tolist() == [8, 10, 10, 12, 12, 14, 14]
    assert codes[3, 1:4].tolist() == [0, 8, 0]  # -0.0 -> 0x0, -1e-3 -> 0x8
    assert r.weight_scale.view(torch.uint8)[4, 0].item() == 0x38  # zero block -> 1.0
    assert r.weight_scale.float()[5, 0].item() == 2.0**-9


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_saturation_with_small_amax(dtype):
    """An amax below the true max (e.g. a clipped calibration) saturates scales at 448 and codes at 6."""
    gen = torch.Generator().manual_seed(run_seed())
    w = heavy_tailed((9, 48), dtype, gen)
    amax = grouped_amax_reference([w]) / 8
    (r,) = quantize_nvfp4([w], weight_amax=amax)
    assert_results_equal(r, quantize_nvfp4_reference(w, amax[0]), "reference")
    assert_results_equal(r, nvfp4_export(w, amax[0]), "modelopt")
    assert (r.weight_scale.view(torch.uint8) == 0x7E).any(), "no block scale saturated: test lost its edge"


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_all_zero_tensor_matches_modelopt(dtype):
    """ModelOpt turns an all-zero tensor into NaN block scales (0/0) and 0x77 codes; we match it."""
    w = torch.zeros(3, 32, dtype=dtype, device=TEST_DEVICE)
    zero = torch.zeros((), device=TEST_DEVICE)
    (r,) = quantize_nvfp4([w])
    assert_results_equal(r, nvfp4_export(w, zero), "modelopt")
    assert_results_equal(quantize_nvfp4_reference(w, zero), r, "reference (NaN x -> code 7)")
    assert_results_equal(r, nvfp4_self(w), "NVFP4QTensor.quantize")


def test_nvfp4_dequantize_round_trip_error_is_bounded():
    """Dequantized values lie within half an E2M1 step (times the block scale) of the input."""
    gen = torch.Generator().manual_seed(3)
    w = heavy_tailed((16, 64), torch.float32, gen)
    (r,) = quantize_nvfp4([w])
    err = (dequantize_nvfp4_reference(r) - w).abs().unflatten(-1, (-1, 16))
    step = (r.weight_scale.float() * r.weight_scale_2).unsqueeze(-1)  # the value of E2M1 1.0 in each block
    assert bool((err <= step * 1.0 + 1e-12).all())  # the largest E2M1 gap is 2 steps, so error <= 1 step


# ---------------------------------------------------------------- FP8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("n", [1, 8, 64])
def test_fp8_matches_reference_and_modelopt(dtype, per_channel, n):
    seed = run_seed()
    weights = mixed_list(n, dtype, seed)
    results = quantize_fp8(weights, per_channel=per_channel)
    for i, (w, r) in enumerate(zip(weights, results)):
        where = f"seed={seed} weights[{i}] {tuple(w.shape)}"
        if per_channel:
            row_amax = w.abs().amax(-1).float()
            assert_results_equal(r, quantize_fp8_reference(w, row_amax, True), f"reference {where}")
            if w.dim() == 2 and w.shape[0] > 1:  # ModelOpt's export squeezes a 1-row amax to 0-dim and fails
                assert_results_equal(r, fp8_channel_export(w, row_amax), f"modelopt {where}")
        else:
            amax = w.abs().amax().float()
            assert_results_equal(r, quantize_fp8_reference(w, amax), f"reference {where}")
            # N-D weights follow ModelOpt's 2-D per-tensor path (its 3-D branch expects per-expert scales).
            flat = fp8_export(w.reshape(-1, w.shape[-1]), amax)
            assert_results_equal(r, FP8Weight(flat.weight.reshape(w.shape), flat.weight_scale), f"modelopt {where}")


def e4m3_probe_values() -> torch.Tensor:
    """Every finite E4M3 value, every midpoint between neighbours, nudges either side, beyond 448."""
    finite = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = finite[torch.isfinite(finite)].unique()  # also merges +0 and -0
    mids = (finite[1:] + finite[:-1]) / 2
    nudged = torch.cat([mids.nextafter(torch.tensor(-1e9)), mids.nextafter(torch.tensor(1e9))])
    extra = torch.tensor([-0.0, 449.0, 460.0, 464.0, 500.0, 1e4, 2.0**-10, 2.0**-11, 3 * 2.0**-11, 1e-30])
    values = torch.cat([finite, mids, nudged, extra, -extra])
    pad = (-len(values)) % 16
    return torch.cat([values, torch.zeros(pad)]).reshape(-1, 16).to(TEST_DEVICE)


def test_fp8_every_e4m3_value_and_midpoint():
    """amax = 448 makes scale 1, so each probe goes straight through the E4M3 rounding."""
    w = e4m3_probe_values()
    amax = torch.tensor([448.0], device=TEST_DEVICE)
    (r,) = quantize_fp8([w], weight_amax=amax)
    reference, modelopt = quantize_fp8_reference(w, amax[0]), fp8_export(w, amax[0])
    if TEST_DEVICE.type == "cuda":
        # torch's CUDA cast turns |x| > 464 (beyond 448 + half a step) into NaN, its CPU cast saturates;
        # the kernels saturate on both.  Only an amax below the weight's own max can get here.
        overflow = w.abs() > 464
        assert bool(overflow.any()), "test lost its edge"
        saturated = torch.where(w < 0, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        for result in (reference, modelopt):
            assert bool(result.weight[overflow].float().isnan().all()), "torch's CUDA cast saturates now"
            result.weight[overflow] = saturated[overflow]
    assert_results_equal(r, reference, "reference")
    assert_results_equal(r, modelopt, "modelopt")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_double_rounding_of_half_precision(dtype):
    """ModelOpt's per-tensor quotient is rounded to the weight dtype first; a single rounding differs."""
    w = heavy_tailed((256, 256), dtype, torch.Generator().manual_seed(0))  # fixed: the edge must be present
    amax = w.abs().amax().float()
    (r,) = quantize_fp8([w])
    assert_results_equal(r, fp8_export(w, amax), "modelopt")
    single = (w.float() / (amax / 448)).to(torch.float8_e4m3fn)
    assert not torch.equal(single.view(torch.uint8), r.weight.view(torch.uint8)), "test lost its edge"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_zero_tensor_and_zero_rows(dtype):
    """ModelOpt's export_amax maps a zero amax (tensor or row) to 448, i.e. scale 1, with a warning."""
    w = torch.zeros(4, 32, dtype=dtype, device=TEST_DEVICE)
    w[1, 3] = -2.0
    (pc,) = quantize_fp8([w], per_channel=True)
    assert_results_equal(pc, fp8_channel_export(w, w.abs().amax(-1).float()), "modelopt per channel")
    z = torch.zeros(2, 16, dtype=dtype, device=TEST_DEVICE)
    (pt,) = quantize_fp8([z])
    assert_results_equal(pt, fp8_export(z, torch.zeros((), device=TEST_DEVICE)), "modelopt per tensor, zero amax")
    assert pt.weight_scale.item() == 1.0 and not pt.weight.view(torch.uint8).any()


INTERPRETER_FLUSHES_BF16_SUBNORMALS = pytest.mark.xfail(
    TEST_DEVICE.type == "cpu",
    reason="the Triton interpreter (3.7) loads bf16 subnormals as 0; the GPU and the CPU reference do not",
    strict=True,
)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.bfloat16, marks=INTERPRETER_FLUSHES_BF16_SUBNORMALS), torch.float16, torch.float32]
)
@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_amax_below_smallest_normal_is_clamped(dtype, per_channel):
    """ModelOpt clamps the export amax up to the weight dtype's smallest normal before dividing."""
    tiny = torch.finfo(dtype).tiny
    w = torch.full((3, 16), tiny / 4, dtype=dtype, device=TEST_DEVICE)
    w[1] = tiny * 3
    (r,) = quantize_fp8([w], per_channel=per_channel)
    if per_channel:
        assert_results_equal(r, fp8_channel_export(w, w.abs().amax(-1).float()), "modelopt")
    else:
        assert_results_equal(r, fp8_export(w, w.abs().amax().float()), "modelopt")


def test_fp8_per_channel_given_row_amax():
    """A quantizer's [N, 1] amax (e.g. reduced across TP ranks) is used as given."""
    gen = torch.Generator().manual_seed(run_seed())
    weights = [heavy_tailed((5, 32), torch.bfloat16, gen), heavy_tailed((3, 48), torch.bfloat16, gen)]
    row_amax = [w.abs().amax(-1, keepdim=True).float() * 2 for w in weights]
    for w, a, r in zip(weights, row_amax, quantize_fp8(weights, row_amax, per_channel=True)):
        assert_results_equal(r, fp8_channel_export(w, a), "modelopt")


def ulp_sensitive_amaxes(divisor: float, count: int) -> torch.Tensor:
    """bf16 amaxes above 1 (the other weights are 0.5) where float32 ``amax / divisor`` and
    ``amax * float32(1 / divisor)`` differ."""
    candidates = (1 + torch.rand(4096, generator=torch.Generator().manual_seed(run_seed())) * 50).bfloat16().float()
    exact = candidates / torch.tensor(divisor)
    product = candidates * float32_reciprocal(divisor)
    return candidates[exact != product][:count]


def test_division_by_a_python_number_follows_the_device(monkeypatch):
    """torch on CUDA divides ``tensor / 448.0`` as ``tensor * float32(1 / 448)`` (ModelOpt's export scales
    inherit this; measured against ModelOpt on an H200).  On CPU the kernels run that branch under the
    interpreter by pretending to be on CUDA; on a GPU run they take it by themselves."""
    if TEST_DEVICE.type == "cpu":
        monkeypatch.setattr(nvfp4_module, "divides_by_reciprocal", lambda device: True)
        monkeypatch.setattr(fp8_module, "divides_by_reciprocal", lambda device: True)
    for divisor, quantize, scale_of in (
        (NVFP4_SCALE_2_DIVISOR, quantize_nvfp4, lambda r: r.weight_scale_2),
        (E4M3_MAX, quantize_fp8, lambda r: r.weight_scale),
        (E4M3_MAX, lambda ws: quantize_fp8(ws, per_channel=True), lambda r: r.weight_scale[0]),
    ):
        amaxes = ulp_sensitive_amaxes(divisor, 8)
        assert len(amaxes) == 8, "test lost its edge: no amax where the two divisions differ"
        weights = [torch.full((1, 32), 0.5, dtype=torch.bfloat16, device=TEST_DEVICE) for _ in amaxes]
        for w, a in zip(weights, amaxes):
            w[0, 3] = a
        for a, r in zip(amaxes, quantize(weights)):
            expected = a * float32_reciprocal(divisor)
            assert scale_of(r).item() == expected.item() != (a / divisor).item(), f"amax {a.item()} / {divisor}"


# ---------------------------------------------------------------- the CPU fast path (compiled C loop)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_cpu_path_matches_reference_and_modelopt(monkeypatch, dtype):
    """The C loop the command line uses on CPU: bitwise equal to the references and to ModelOpt, on
    fresh ragged inputs, views, the crafted edges, an all-zero tensor and a clipped amax."""
    assert native.library() is not None, "no C compiler here: the fast path would silently be the reference"
    seed = run_seed()
    stacked = heavy_tailed((3, 17, 64), dtype, torch.Generator().manual_seed(seed))
    cpu = [
        *[w.cpu() for w in mixed_list(24, dtype, seed)],
        *stacked.cpu().unbind(0),
        stacked[1, :, 16:48].cpu(),
        crafted_nvfp4_weight(dtype).cpu(),
        torch.zeros(3, 32, dtype=dtype),
    ]
    amax = grouped_amax_reference(cpu)
    clipped = amax.clone()
    clipped[0] /= 8  # saturating scales and codes
    use_engine(monkeypatch, "native")
    reset_launch_counts()
    assert_bitwise_equal(grouped_amax(cpu), amax, f"amax seed={seed}")
    for weight_amax in (amax, clipped):
        results = quantize_nvfp4(cpu, weight_amax)
        for i, (w, r) in enumerate(zip(cpu, results)):
            where = f"seed={seed} weights[{i}] {tuple(w.shape)}"
            assert_results_equal(r, quantize_nvfp4_reference(w, weight_amax[i]), f"reference {where}")
            assert_results_equal(r, nvfp4_export(w, weight_amax[i]), f"modelopt {where}")
    assert launch_counts() == {}


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("n", [1, 8, pytest.param(64, marks=pytest.mark.slow)])
def test_one_launch_per_dtype(n):
    """The launch count depends on dtypes, never on the number of tensors."""
    weights = mixed_list(n, torch.bfloat16, 5, max_k=32)
    reset_launch_counts()
    grouped_amax(weights)
    quantize_nvfp4(weights, grouped_amax(weights))
    quantize_fp8(weights)
    quantize_fp8(weights, per_channel=True)
    assert launch_counts() == {"amax": 3, **nvfp4_launches_per_dtype(), "fp8": 2}


def test_no_stacking_copy_outputs_are_separate():
    """Outputs are one allocation per tensor, so a safetensors writer can save them without copies."""
    stacked = torch.randn(4, 8, 32, dtype=torch.bfloat16, device=TEST_DEVICE)
    results = quantize_nvfp4(list(stacked.unbind(0)))
    pointers = {r.weight.untyped_storage().data_ptr() for r in results}
    assert len(pointers) == 4
    assert all(r.weight_scale_2.dim() == 0 for r in results)


def test_reference_path_without_interpreter(monkeypatch):
    """On CPU without TRITON_INTERPRET (and the C loop off) the public functions run the references."""
    use_engine(monkeypatch, "reference")
    weights = [w.cpu() for w in mixed_list(4, torch.bfloat16, 9, max_k=64)]
    reset_launch_counts()
    nv = quantize_nvfp4(weights)
    f8 = quantize_fp8(weights, per_channel=True)
    assert launch_counts() == {}
    amax = grouped_amax_reference(weights)
    for i, w in enumerate(weights):
        assert_results_equal(nv[i], nvfp4_export(w, amax[i]), f"weights[{i}]")
        assert isinstance(f8[i], FP8Weight)


def test_empty_list():
    assert grouped_amax([]).shape == (0,)
    assert quantize_nvfp4([]) == []
    assert quantize_fp8([], per_channel=True) == []


# Triton picks the interpreter when a kernel is decorated, so a GPU session cannot also run it.
ENGINES = ["reference", "native", "gpu"] if TEST_DEVICE.type == "cuda" else ["reference", "native", "interpreter"]


def use_engine(monkeypatch, engine: str) -> None:
    """CPU engines: the Triton interpreter, the compiled C loop (native.py) or the torch references."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if engine == "interpreter" else "0")
    monkeypatch.setenv("MOEQ_TRITON_NATIVE", "1" if engine == "native" else "0")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_weight_is_named(monkeypatch, engine, bad):
    use_engine(monkeypatch, engine)
    device = TEST_DEVICE if engine == "gpu" else "cpu"
    weights = [torch.randn(4, 32), torch.randn(6, 16, dtype=torch.bfloat16), torch.randn(2, 16)]
    weights = [w.to(device) for w in weights]
    weights[2][1, 5] = float(bad)
    for call in (
        lambda: grouped_amax(weights),
        lambda: quantize_nvfp4(weights),
        lambda: quantize_nvfp4(weights, torch.ones(3)),
        lambda: quantize_fp8(weights, torch.ones(3)),
        lambda: quantize_fp8(weights, per_channel=True),
    ):
        with pytest.raises(ValueError, match=r"weights\[2\] \(shape \(2, 16\), torch.float32\) contains NaN or Inf"):
            call()


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([torch.zeros(4, 16, dtype=torch.int8)], r"weights\[0\] .*int8.*unsupported dtype"),
        ([torch.zeros(4, 32), torch.zeros(16, 4).t()], r"weights\[1\] .*last dim must have stride 1"),
        ([torch.zeros(4, 32), torch.zeros(4, 32, device="meta")], r"weights\[1\] .* is on meta"),
        ([torch.zeros(4, 24)], r"weights\[0\] \(shape \(4, 24\).*not a multiple of the block size 16"),
        ([torch.zeros(())], r"weights\[0\] .*0-dim"),
        ([torch.zeros(3, 4, 32).transpose(0, 1)], r"weights\[0\] .*leading dims do not collapse"),
    ],
)
def test_bad_input_is_named(weights, message):
    with pytest.raises((ValueError, TypeError), match=message):
        quantize_nvfp4(weights)


def test_bad_amax_is_named():
    w = [torch.randn(4, 16), torch.randn(4, 16)]
    with pytest.raises(ValueError, match=r"weight_amax\[1\]"):
        quantize_nvfp4(w, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="2 values for 1 weights"):
        quantize_nvfp4(w[:1], torch.ones(2))
    with pytest.raises(ValueError, match=r"weight_amax\[1\] for weights\[1\]"):
        quantize_fp8(w, [torch.ones(4), torch.tensor([1.0, -1.0, 1.0, 1.0])], per_channel=True)
    with pytest.raises(ValueError, match=r"weight_amax\[0\] has 3 values .* with 4 rows"):
        quantize_fp8(w, [torch.ones(3), torch.ones(4)], per_channel=True)


@pytest.mark.parametrize("model", MODEL_SHAPES, ids=lambda m: m.name)
def test_real_model_expert_shapes_shrunk(model):
    """Real fc1/fc2 aspect ratios and K from each model, few rows, as views of one stacked tensor."""
    gen = torch.Generator().manual_seed(run_seed())
    (_, k1), (_, k2) = model.fc1, model.fc2
    fc1 = heavy_tailed((3, 5, k1 // 16), torch.bfloat16, gen)  # K shrunk 16x but still a multiple of 16
    fc2 = heavy_tailed((3, 7, k2 // 16), torch.bfloat16, gen)
    weights = [*fc1.unbind(0), *fc2.unbind(0)]
    amax = grouped_amax(weights)
    for w, a, r in zip(weights, amax, quantize_nvfp4(weights, amax)):
        assert_results_equal(r, nvfp4_export(w, a), model.name)

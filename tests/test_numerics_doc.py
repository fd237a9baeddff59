"""The facts docs/numerics.md states about ModelOpt 0.47, torch and the Triton interpreter, checked against
them (not against our kernels): when an upstream release changes one, this fails and the page needs a fix."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import triton
import triton.language as tl

E4M3 = torch.float8_e4m3fn


def test_e2m1_ties_sign_and_nan_as_modelopt_casts():
    """Section "E2M1 (FP4)": ties to the even code, saturation above 5, sign from x < 0, NaN -> 7."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 100.0, -0.0, -0.1, -0.25, -6.0, float("nan")])
    expected = [0, 2, 2, 4, 4, 6, 6, 7, 7, 0, 8, 8, 15, 7]
    assert NVFP4QTensor._cast_fp4(x.clone()).tolist() == expected


def test_nvfp4_zero_block_zero_tensor_and_packing():
    """Section "NVFP4": a zero block stores 0x38, the even element sits in the low nibble, and an all-zero
    tensor gives NaN block scales and codes 0x77."""
    from moeq_triton.modelopt.oracle import nvfp4_export

    w = torch.zeros(1, 32, dtype=torch.bfloat16)
    w[0, 16], w[0, 17] = 6.0, -3.0  # block amax 6 = tensor amax: scale 448, x = w * 448 / (448 * 6 / 6)
    q = nvfp4_export(w, torch.tensor(6.0))
    assert q.weight_scale.view(torch.uint8).tolist() == [[0x38, 0x7E]]
    assert q.weight[0, 8].item() == 0x7 | (0xD << 4)  # code(6) = 7 low, code(-3) = 8 | 5 high

    q = nvfp4_export(torch.zeros(2, 32, dtype=torch.bfloat16), torch.zeros(()))
    assert torch.isnan(q.weight_scale.float()).all() and (q.weight == 0x77).all() and q.weight_scale_2.item() == 0


def test_fp8_per_tensor_whole_model_export_skips_export_amax():
    """Section "FP8 per tensor": ModelOpt's HF exporter divides the raw amax (an all-zero weight: scale 0,
    NaN codes), while ``get_scaling_factor`` (our oracle, and the kernels) maps a zero amax to scale 1."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight

    from moeq_triton.modelopt.oracle import fp8_export

    model = torch.nn.Sequential(torch.nn.Linear(32, 16, bias=False).to(torch.bfloat16))
    torch.nn.init.zeros_(model[0].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, copy.deepcopy(mtq.FP8_DEFAULT_CFG), forward_loop=None)
        _export_quantized_weight(model[0], torch.bfloat16)
    assert model[0].weight_scale.item() == 0.0
    assert (model[0].weight.view(torch.uint8) & 0x7F == 0x7F).all()  # E4M3 NaN

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fp8_export(torch.zeros(16, 32, dtype=torch.bfloat16), torch.zeros(()))
    assert ours.weight_scale.item() == 1.0 and (ours.weight.view(torch.uint8) == 0).all()


def test_torch_cpu_division_and_e4m3_cast():
    """Section "How torch divides", rules 2 and 3 on CPU, and section "E4M3": the CPU cast saturates."""
    w = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    s = torch.tensor(0.0123456)
    q = w / s
    assert q.dtype == torch.bfloat16 and (w / s.reshape(1)).dtype == torch.float32
    assert torch.equal(q, (w.float() / s).to(torch.bfloat16))  # the divisor keeps its float32 value on CPU
    assert not torch.equal(q, (w.float() / s.to(torch.bfloat16).float()).to(torch.bfloat16))  # (CUDA's form)
    big = torch.tensor([448.0, 465.0, 1e6, float("inf"), -float("inf")])
    assert big.to(E4M3).float().tolist() == [448.0, 448.0, 448.0, 448.0, -448.0]
    ties = torch.tensor([2.0**-10, 3 * 2.0**-11, 1.5 * 2.0**-9, 1.0625])
    assert ties.to(E4M3).float().tolist() == [0.0, 2.0**-9, 2.0**-8, 1.0]  # RNE, subnormals included


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(tl.float8e4nv).to(tl.uint8, bitcast=True))


@triton.jit
def _fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr):
    tl.store(out_ptr, tl.fma(tl.load(a_ptr), tl.load(b_ptr), tl.load(c_ptr)))


def test_interpreter_float8_cast_and_fma():
    """Section "The Triton interpreter's float8 cast": why the kernels round onto the E4M3 grid themselves
    (wrong in triton 3.7.1 and 3.9.0) and keep fma out of the portable formulation (3.7.1 rounds it twice)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a fact about the interpreter; this run compiles kernels for a GPU")
    x = torch.zeros(8)
    x[:5] = torch.tensor([7.9, 1.0625, 500.0, 1000.0, 3.0])
    y = torch.zeros(8, dtype=torch.uint8)
    _cast_kernel[(1,)](x, y, N=8)
    assert y[:5].view(E4M3).float().tolist() == [4.0, 1.125, 256.0, 256.0, 3.0]
    assert x[:5].to(E4M3).float().tolist() == [8.0, 1.0, 448.0, 448.0, 3.0]  # what torch gives
    a, out = torch.tensor([1 + 2.0**-12]), torch.zeros(1)
    _fma_kernel[(1,)](a, a, torch.tensor([-1.0]), out)
    # The exact a * a - 1 is 2^-11 + 2^-24. triton 3.7.1 (the pinned one) rounds twice; 3.9.0 rounds once.
    rounds_once = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9)
    assert out.item() == (2.0**-11 + 2.0**-24 if rounds_once else 2.0**-11), triton.__version__

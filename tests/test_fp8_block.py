"""FP8 128x128-block quantization: kernel vs torch reference vs ModelOpt's FP8_PB_WO export, and the
``fp8-block`` checkpoint the command and export_hf write (the layout vLLM, SGLang and TensorRT-LLM load)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from assertions import assert_bitwise_equal, assert_results_equal
from device import TEST_DEVICE
from modelopt.torch.export.model_config import QUANTIZATION_FP8_PB_WO
from modelopt.torch.export.quant_utils import get_scaling_factor, to_quantized_weight
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.nn import TensorQuantizer
from moeq_triton.kernels import (
    FP8BlockWeight,
    NonFiniteWeightError,
    dequantize_fp8_block_reference,
    launch_counts,
    quantize_fp8_block,
    quantize_fp8_block_reference,
    reset_launch_counts,
)
from moeq_triton.kernels.formats import E4M3_MAX, FP8_BLOCK_SIZE

from moeq_triton.model_shapes import MODEL_SHAPES

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BLOCKS = {-1: FP8_BLOCK_SIZE, -2: FP8_BLOCK_SIZE}


def modelopt_fp8_block(w: torch.Tensor) -> FP8BlockWeight:
    """ModelOpt 0.47's own chain for one weight: a real 2-D-block TensorQuantizer calibrated with max,
    its export scale (``get_scaling_factor`` -> ``export_amax``), then ``to_quantized_weight(FP8_PB_WO)``
    as ``_export_quantized_weight`` calls it.  The scale comes back (bn, 1, bk, 1); squeezed to 2-D here."""
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=None, block_sizes=dict(BLOCKS)))
    quantizer.to(w.device)
    quantizer.disable_quant()
    quantizer.enable_calib()
    quantizer(w)
    quantizer.load_calib_amax()
    quantizer.disable_calib()
    quantizer.enable_quant()
    scale = get_scaling_factor(quantizer)
    codes = to_quantized_weight(w, scale, QUANTIZATION_FP8_PB_WO, None, FP8_BLOCK_SIZE)
    bn, bk = -(-w.shape[0] // FP8_BLOCK_SIZE), -(-w.shape[1] // FP8_BLOCK_SIZE)
    return FP8BlockWeight(codes, scale.reshape(bn, bk))


def heavy_tailed(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Cubed normals with outlier columns and one quiet block row, so block scales span many binades."""
    w = torch.randn(shape, generator=gen) ** 3
    cols = torch.randint(0, shape[-1], (max(1, shape[-1] // 32),), generator=gen)
    w[..., cols] *= 40.0
    if shape[0] > FP8_BLOCK_SIZE:
        w[FP8_BLOCK_SIZE:] *= 1e-3
    return w.to(dtype).to(TEST_DEVICE)


def ragged_list(seed: int, dtype) -> list[torch.Tensor]:
    """Shapes on both sides of the 128 boundaries (1, 127, 129, 200 rows/cols) plus a DeepSeek-V3 and a
    Qwen3-30B-A3B expert shape shrunk to the interpreter's budget."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    shapes = [(1, 5), (127, 129), (129, 127), (200, 72), (96, 192)]
    for m in MODEL_SHAPES:  # an expert's gate_proj [moe_intermediate, hidden], shrunk, off the boundary
        shapes.append((min(m.moe_intermediate // 8 + 3, 264), min(m.hidden // 16 + 5, 200)))
    rng.shuffle(shapes)
    return [heavy_tailed(s, dtype, gen) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_reference_and_modelopt(dtype):
    """Random ragged shapes (seed recorded in the message): kernel == torch reference == ModelOpt's
    export chain, every byte of codes and scales.  A misindexed tensor, strip or block column, a scale
    computed in the wrong dtype or a quotient rounded twice would each change bytes here."""
    seed = random.SystemRandom().randrange(1 << 30)
    weights = ragged_list(seed, dtype)
    ours = quantize_fp8_block(weights)
    for i, w in enumerate(weights):
        what = f"seed {seed}, {dtype}, weights[{i}] {tuple(w.shape)}"
        assert_results_equal(ours[i], quantize_fp8_block_reference(w), f"{what} vs reference")
        assert_results_equal(ours[i], modelopt_fp8_block(w), f"{what} vs ModelOpt")


def test_one_launch_per_dtype_for_all_tensors():
    gen = torch.Generator().manual_seed(7)
    weights = [heavy_tailed((130, 40), torch.bfloat16, gen) for _ in range(3)]
    weights += [heavy_tailed((20, 140), torch.float16, gen) for _ in range(2)]
    reset_launch_counts()
    quantize_fp8_block(weights)
    expected = {"fp8_block": 2} if TEST_DEVICE.type == "cuda" or _interpreting() else {}
    assert launch_counts() == expected


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("dtype", DTYPES)
def test_crafted_edges(dtype):
    """Zero blocks (scale 1.0, codes 0, -0.0 keeps its sign), a block that saturates exactly at 448, a
    block below the dtype's smallest normal (clamped amax), ties of the E4M3 grid, a strided row view."""
    w = torch.zeros(130, 260, dtype=torch.float32)
    w[0, 0] = -0.0
    w[:128, 128:256] = torch.linspace(-3.0, 3.0, 128 * 128).reshape(128, 128)  # many exact E4M3 ties
    w[128:, :128] = torch.finfo(dtype).tiny / 4 if dtype != torch.bfloat16 else 2.0**-130
    w[128, 256] = E4M3_MAX * 2  # the block max maps exactly onto 448
    w[129, 257] = -E4M3_MAX * 2
    w = w.to(dtype).to(TEST_DEVICE)
    view = torch.cat([w, w], dim=1)[:, : w.shape[1]]  # row stride 520, last-dim stride 1
    for x in (w, view):
        ours = quantize_fp8_block([x])[0]
        assert_results_equal(ours, quantize_fp8_block_reference(x), "vs reference")
        assert_results_equal(ours, modelopt_fp8_block(x), "vs ModelOpt")
    ours = quantize_fp8_block([w])[0]
    assert ours.weight_scale_inv[0, 0].item() == 1.0  # all-zero block: amax 0 -> 448 -> scale 1
    assert ours.weight.view(torch.uint8)[0, 0].item() == 0x80  # -0.0 stays negative zero
    assert ours.weight.view(torch.uint8)[128, 256].item() == 0x7E  # 448
    assert ours.weight.view(torch.uint8)[129, 257].item() == 0xFE  # -448


def test_dequantized_within_the_format_error():
    """|dequant - w| <= half an E4M3 step of the block's largest binade: 2^-4 of the block amax (3 mantissa
    bits), measured per block; a wrong scale layout (transposed, shifted) breaks this bound."""
    gen = torch.Generator().manual_seed(11)
    w = heavy_tailed((200, 300), torch.bfloat16, gen)
    q = quantize_fp8_block([w])[0]
    back = dequantize_fp8_block_reference(q).cpu()
    src = w.float().cpu()
    for i in range(q.weight_scale_inv.shape[0]):
        for j in range(q.weight_scale_inv.shape[1]):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            amax = src[rows, cols].abs().max().item()
            err = (back[rows, cols] - src[rows, cols]).abs().max().item()
            assert err <= amax * 2.0**-4 * 1.0001, (i, j, err, amax)


def test_bad_input_is_named():
    gen = torch.Generator().manual_seed(3)
    good = heavy_tailed((10, 20), torch.bfloat16, gen)
    bad = good.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=r"weights\[1\]") as info:
        quantize_fp8_block([good, bad])
    assert info.value.index == 1
    with pytest.raises(ValueError, match=r"weights\[0\].*2-D"):
        quantize_fp8_block([good.reshape(2, 5, 20)])

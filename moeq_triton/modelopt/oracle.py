"""ModelOpt 0.47's own export functions, called the way its HF exporter calls them.

These are the ground truth the kernels must match bit for bit; nothing here re-derives the math.
"""

from __future__ import annotations

import torch
from modelopt.torch.export.model_config import (
    QUANTIZATION_FP8,
    QUANTIZATION_FP8_PC_PT,
    QUANTIZATION_W4A16_NVFP4,
)
from modelopt.torch.export.quant_utils import get_scaling_factor, to_quantized_weight
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.nn import TensorQuantizer
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

from moeq_triton.kernels import FP8Weight, NVFP4Weight
from moeq_triton.modelopt.patches import quantized_data, quantizer_stand_in


def nvfp4_export(w: torch.Tensor, amax: torch.Tensor) -> NVFP4Weight:
    """``_export_quantized_weight`` for W4A16_NVFP4 with a calibrated per-tensor ``_amax``."""
    quantizer = quantizer_stand_in(amax.to(w.dtype) if w.dtype != torch.float32 else amax, {-1: 16, "type": "dynamic"})
    scale_2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(quantizer)
    scale = NVFP4QTensor.get_weights_scaling_factor(w, 16, scale_2)[0]
    packed = to_quantized_weight(w, scale, QUANTIZATION_W4A16_NVFP4, scale_2, 16)
    return NVFP4Weight(packed, scale, scale_2.squeeze())


def nvfp4_self(w: torch.Tensor) -> NVFP4Weight:
    """``NVFP4QTensor.quantize`` on the weight alone (it takes its own amax)."""
    q, scale, scale_2 = NVFP4QTensor.quantize(w, 16)
    return NVFP4Weight(quantized_data(q), scale, scale_2)


def fp8_export(w: torch.Tensor, amax: torch.Tensor) -> FP8Weight:
    """The exporter's per-tensor FP8 branch: a real TensorQuantizer's ``get_scaling_factor`` (float32
    amax / maxbound on the amax's device), then ``to_quantized_weight``."""
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3)))
    quantizer.amax = amax.reshape(()).to(w.device)
    scale = get_scaling_factor(quantizer).reshape(())  # the exporter writes it 0-dim (test_quantize_command)
    return FP8Weight(to_quantized_weight(w, scale, QUANTIZATION_FP8), scale)


def fp8_channel_export(w: torch.Tensor, row_amax: torch.Tensor) -> FP8Weight:
    """FP8_PER_CHANNEL_PER_TOKEN: a real axis-0 TensorQuantizer's export scale, then the weight."""
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=0))
    quantizer.amax = row_amax.reshape(-1, 1).to(w.dtype)
    scale = get_scaling_factor(quantizer)
    return FP8Weight(to_quantized_weight(w, scale, QUANTIZATION_FP8_PC_PT), scale)

"""moeq_triton.kernels: grouped amax, NVFP4 and FP8 weight quantization (torch + triton only).

Each public function takes any number of weights and issues one Triton launch per dtype through a
device table of pointers (``grouping``; NVFP4 on a GPU two, ``nvfp4.nvfp4_launches``); a plain-torch
reference sits beside each kernel.
"""

from .amax import NonFiniteWeightError, grouped_amax, grouped_amax_reference, grouped_row_amax
from .dequant import FP8BlockSource, dequantize_fp8_block, dequantize_fp8_block_reference
from .fp8 import FP8Weight, fp8_layout, quantize_fp8, quantize_fp8_reference
from .fp8_block import (
    FP8BlockWeight,
    fp8_block_layout,
    quantize_fp8_block,
    quantize_fp8_block_reference,
)
from .grouping import launch_counts, reset_launch_counts, use_triton
from .nvfp4 import NVFP4Weight, dequantize_nvfp4_reference, nvfp4_layout, quantize_nvfp4, quantize_nvfp4_reference

__all__ = [
    "FP8BlockSource",
    "FP8BlockWeight",
    "FP8Weight",
    "NonFiniteWeightError",
    "NVFP4Weight",
    "dequantize_fp8_block",
    "dequantize_fp8_block_reference",
    "dequantize_nvfp4_reference",
    "fp8_block_layout",
    "fp8_layout",
    "grouped_amax",
    "grouped_amax_reference",
    "grouped_row_amax",
    "launch_counts",
    "nvfp4_layout",
    "quantize_fp8",
    "quantize_fp8_block",
    "quantize_fp8_block_reference",
    "quantize_fp8_reference",
    "quantize_nvfp4",
    "quantize_nvfp4_reference",
    "reset_launch_counts",
    "use_triton",
]

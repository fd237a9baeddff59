"""Which checkpoint format a model's enabled ModelOpt weight quantizers describe (for export_hf).

Export recomputes each amax as the weights' own max per scale group, which is exactly what ModelOpt's ``max``
calibration (and ``triton_grouped``) gives; a model calibrated otherwise is refused here rather than exported
with different scales.
"""

from __future__ import annotations

import importlib.util

import torch

from moeq_triton.checkpoint.formats import FORMATS, Format
from moeq_triton.checkpoint.io import CheckpointError
from moeq_triton.kernels.formats import FP8_BLOCK_SIZE, NVFP4_BLOCK_SIZE
from moeq_triton.modelopt import patches


def detect_format(model: torch.nn.Module) -> Format | None:
    """The format of the enabled weight quantizers (None: none enabled); mixed formats are refused."""
    if importlib.util.find_spec("modelopt") is None:
        return None  # without ModelOpt installed no model holds its quantizers: exported unquantized
    from modelopt.torch.quantization.calib import MaxCalibrator
    from modelopt.torch.quantization.nn import TensorQuantizer

    found = set()
    for name, module in model.named_modules():
        if not isinstance(module, TensorQuantizer) or not module.is_enabled:
            continue
        if getattr(module, "pre_quant_scale", None) is not None:
            raise CheckpointError(f"{name} has a pre_quant_scale (AWQ/SmoothQuant): use ModelOpt's exporter")
        if "weight_quantizer" not in name:
            continue
        calibrator = patches.calibrator(module)
        if calibrator is not None and not isinstance(calibrator, MaxCalibrator):
            raise CheckpointError(
                f"{name} was calibrated with {type(calibrator).__name__}; export_hf recomputes max amaxes "
                "and would drop that calibration: use ModelOpt's exporter"
            )
        if module.num_bits == (2, 1) and (module.block_sizes or {}).get(-1) == NVFP4_BLOCK_SIZE:
            found.add("nvfp4")
        elif module.num_bits == (4, 3) and _is_fp8_2d_block(module.block_sizes):
            found.add("fp8-block")
        elif module.num_bits == (4, 3) and module.block_sizes is None:
            found.add("fp8-per-channel" if module.axis == 0 else "fp8")
        else:
            raise CheckpointError(f"{name}: num_bits {module.num_bits} / blocks {module.block_sizes} is not exportable")
    if len(found) > 1:
        raise CheckpointError(f"the model mixes weight formats {sorted(found)}; export supports one per checkpoint")
    return FORMATS[found.pop()] if found else None


def _is_fp8_2d_block(block_sizes: dict | None) -> bool:
    """FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG's weight quantizer: static 128x128 blocks over the last two dims."""
    blocks = dict(block_sizes or {})
    static = blocks.pop("type", "static") == "static" and blocks.pop("scale_bits", None) is None
    return static and blocks == {-1: FP8_BLOCK_SIZE, -2: FP8_BLOCK_SIZE}

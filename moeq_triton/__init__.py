"""moeq-triton: grouped NVFP4/FP8 weight quantization of Mixture-of-Experts models.

``moeq_triton.kernels`` is the compute layer; this package is the integration layer.
"""

__version__ = "0.1.0"

from .modelopt_backend import CALIBRATOR, CALIBRATOR_SHARED, calibration_stats, format_stats, make_configs, register

register()  # importing moeq_triton makes "calibrator": "triton_grouped" valid in mtq.quantize configs

_CONFIGS = make_configs()
NVFP4_WEIGHT_ONLY_CFG = _CONFIGS["NVFP4_WEIGHT_ONLY_CFG"]
FP8_WEIGHT_ONLY_CFG = _CONFIGS["FP8_WEIGHT_ONLY_CFG"]
FP8_PER_CHANNEL_WEIGHT_ONLY_CFG = _CONFIGS["FP8_PER_CHANNEL_WEIGHT_ONLY_CFG"]

__all__ = [
    "CALIBRATOR",
    "CALIBRATOR_SHARED",
    "FP8_PER_CHANNEL_WEIGHT_ONLY_CFG",
    "FP8_WEIGHT_ONLY_CFG",
    "NVFP4_WEIGHT_ONLY_CFG",
    "calibration_stats",
    "format_stats",
    "register",
]

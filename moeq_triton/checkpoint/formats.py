"""The checkpoint vocabulary (what vLLM, TensorRT-LLM and SGLang load), in one place.

The modelopt layouts follow ModelOpt 0.47's ``export_hf_checkpoint`` output for weight-only configs, key
for key (compared against a real export in tests/checkpoint/test_quantize_command.py and tests/export/); only
``producer`` differs: it names this project.
``fp8-block`` follows the engines' own FP8 block layout instead (DeepSeek-V3, Qwen ``*-FP8``): see
``FP8_BLOCK_CONFIG`` for the keys and the loader lines they were checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeq_triton import __version__  # noqa: F401 (the package init is light)
from moeq_triton.kernels.formats import NVFP4_BLOCK_SIZE

PRODUCER = {"name": "moeq-triton", "version": __version__}


@dataclass(frozen=True)
class Format:
    """One output format of the command line and the exporter."""

    name: str  # command-line spelling
    quant_algo: str
    per_channel: bool = False
    fp8_block: bool = False  # 128x128-block FP8 in the engines' "quant_method": "fp8" layout, not modelopt's

    @property
    def is_fp8_block(self) -> bool:
        return self.fp8_block

    @property
    def is_nvfp4(self) -> bool:
        return self.quant_algo == "W4A16_NVFP4"

    def hf_quant_config(self, exclude_modules: list[str]) -> dict | None:
        """hf_quant_config.json, or None where the file must be absent (fp8-block: TensorRT-LLM treats the
        file as authoritative and would read a modelopt quant_algo from it instead of config.json)."""
        if self.fp8_block:
            return None
        quantization = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": None}
        if self.is_nvfp4:
            quantization["group_size"] = NVFP4_BLOCK_SIZE
        quantization["exclude_modules"] = sorted(exclude_modules)
        return {"producer": dict(PRODUCER), "quantization": quantization}

    def quantization_config(self, exclude_modules: list[str]) -> dict:
        """The ``quantization_config`` entry of config.json."""
        if self.fp8_block:
            kept = sorted(exclude_modules)
            return {**FP8_BLOCK_CONFIG, "ignored_layers": kept, "modules_to_not_convert": list(kept)}
        config: dict = {}
        if self.is_nvfp4:
            weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_BLOCK_SIZE}
            config["config_groups"] = {"group_0": {"weights": weights, "targets": ["Linear"]}}
        elif not self.per_channel:
            eight_bit = {"dynamic": False, "num_bits": 8, "type": "float"}
            group = {"input_activations": dict(eight_bit), "weights": dict(eight_bit), "targets": ["Linear"]}
            config["config_groups"] = {"group_0": group}
        config.update(
            ignore=sorted(exclude_modules), quant_algo=self.quant_algo, producer=dict(PRODUCER), quant_method="modelopt"
        )
        return config


FP8_BLOCK_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
"""config.json ``quantization_config`` of fp8-block, as the engines' loaders read it (checked 2026-11-29):
vLLM ``Fp8Config.from_config`` reads ``ignored_layers`` and falls back to ``modules_to_not_convert``; SGLang's
reads ``["ignored_layers", "modules_to_not_convert"]`` (older releases ``ignored_layers`` only); TensorRT-LLM's
``load_hf_quant_config`` maps quant_method fp8 + weight_block_size (128, 128) to FP8_BLOCK_SCALES and reads
``modules_to_not_convert``.  So the kept modules are written under both keys.  Weights carry
``weight_scale_inv`` float32 [ceil(N/128), ceil(K/128)] (the name every loader registers)."""

FORMATS = {
    f.name: f
    for f in (
        Format("nvfp4", "W4A16_NVFP4"),
        Format("fp8", "FP8"),
        Format("fp8-per-channel", "FP8_PER_CHANNEL_PER_TOKEN", per_channel=True),
        Format("fp8-block", "FP8_BLOCK_SCALES", fp8_block=True),  # TensorRT-LLM's name for this layout
    )
}

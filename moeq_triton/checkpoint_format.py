"""The modelopt checkpoint vocabulary (what vLLM, TensorRT-LLM and SGLang load), in one place.

Layouts follow ModelOpt 0.47's ``export_hf_checkpoint`` output for weight-only configs, key for key
(shared/reference/checkpoint-format.md); only ``producer`` differs: it names this project.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import __version__  # noqa: F401 (the package init is light)

PRODUCER = {"name": "moeq-triton", "version": __version__}


@dataclass(frozen=True)
class Format:
    """One output format of the command line and the exporter."""

    name: str  # command-line spelling
    quant_algo: str
    per_channel: bool = False

    @property
    def is_nvfp4(self) -> bool:
        return self.quant_algo == "W4A16_NVFP4"

    @property
    def shares_qkv_scale(self) -> bool:
        """ModelOpt unifies q/k/v global amax for NVFP4 only; FP8 keeps one scale per projection."""
        return self.is_nvfp4

    def hf_quant_config(self, exclude_modules: list[str]) -> dict:
        quantization = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": None}
        if self.is_nvfp4:
            quantization["group_size"] = 16
        quantization["exclude_modules"] = sorted(exclude_modules)
        return {"producer": dict(PRODUCER), "quantization": quantization}

    def quantization_config(self, exclude_modules: list[str]) -> dict:
        """The ``quantization_config`` entry of config.json."""
        config: dict = {}
        if self.is_nvfp4:
            weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
            config["config_groups"] = {"group_0": {"weights": weights, "targets": ["Linear"]}}
        elif not self.per_channel:
            eight_bit = {"dynamic": False, "num_bits": 8, "type": "float"}
            group = {"input_activations": dict(eight_bit), "weights": dict(eight_bit), "targets": ["Linear"]}
            config["config_groups"] = {"group_0": group}
        config.update(
            ignore=sorted(exclude_modules), quant_algo=self.quant_algo, producer=dict(PRODUCER), quant_method="modelopt"
        )
        return config


FORMATS = {
    f.name: f
    for f in (
        Format("nvfp4", "W4A16_NVFP4"),
        Format("fp8", "FP8"),
        Format("fp8-per-channel", "FP8_PER_CHANNEL_PER_TOKEN", per_channel=True),
    )
}

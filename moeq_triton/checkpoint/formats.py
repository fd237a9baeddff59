"""What a format means on disk (what vLLM, TensorRT-LLM and SGLang load), in one place: the config entries, the
tensors a quantized weight becomes (names, shapes, dtypes), the input shapes a format takes, and how the stored
tensors read back as values.  The number formats themselves (block sizes, E4M3/E2M1) are ``kernels.formats``.

The modelopt layouts follow ModelOpt 0.47's ``export_hf_checkpoint`` output for weight-only configs, key
for key (compared against a real export in tests/checkpoint/test_quantize_command.py and tests/export/); only
``producer`` differs: it names this project.
``fp8-block`` follows the engines' own FP8 block layout instead (DeepSeek-V3, Qwen ``*-FP8``): see
``FP8_BLOCK_CONFIG`` for the keys and the loader lines they were checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeq_triton.kernels import (
    NVFP4Weight,
    dequantize_fp8_block_reference,
    dequantize_nvfp4_reference,
    fp8_block_layout,
    fp8_layout,
    nvfp4_layout,
)
from moeq_triton.kernels.formats import FP8_BLOCK_SIZE, NVFP4_BLOCK_SIZE
from moeq_triton.version import __version__

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

    @property
    def input_multiple(self) -> int:
        """The input dim (the quantized, last one) of a weight must be a multiple of this: NVFP4 writes one
        E4M3 scale per block of 16 and has no partial block; the FP8 formats take any size."""
        return NVFP4_BLOCK_SIZE if self.is_nvfp4 else 1

    @property
    def shares_input_scale(self) -> bool:
        """Linears fed the same input (q/k/v, a dense MLP's gate/up) share their per-tensor scale on disk: NVFP4's
        ``weight_scale_2``, as ModelOpt's export writes it.  An expert's gate/up share theirs in every format."""
        return self.is_nvfp4

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
    "weight_block_size": [FP8_BLOCK_SIZE, FP8_BLOCK_SIZE],
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


def output_layout(shape: tuple[int, ...], fmt: Format, transposed: bool = False):
    """(shape, dtype) of each tensor a quantized weight becomes, in output_names order.

    ``transposed``: a stacked [E, in, out] expert tensor, quantized as [E, out, in] and written back with
    the last two dims swapped (ModelOpt's layout for bmm-style experts)."""
    if not transposed:
        if fmt.is_fp8_block:
            return fp8_block_layout(shape)
        return nvfp4_layout(shape) if fmt.is_nvfp4 else fp8_layout(shape, fmt.per_channel)
    swapped = (*shape[:-2], shape[-1], shape[-2])
    return [(_swap(s) if len(s) == len(shape) else s, d) for s, d in output_layout(swapped, fmt)]


def _swap(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    return (*shape[:-2], shape[-1], shape[-2])


def output_names(name: str, fmt: Format) -> list[str]:
    """The tensors a quantized weight becomes in the checkpoint (``X.weight`` -> ``X.weight_scale``; a stacked
    parameter ``X.gate_up_proj`` -> ``X.gate_up_proj_weight_scale``, as ModelOpt names them; fp8-block:
    ``X.weight_scale_inv``, as the engines name it)."""
    if fmt.is_fp8_block:
        return [name, name + "_scale_inv"]
    scale = name + "_scale" if name.endswith(".weight") else name + "_weight_scale"
    return [name, scale] + ([scale + "_2"] if fmt.is_nvfp4 else [])


def dequantize(tensors: dict[str, torch.Tensor], name: str, fmt: Format) -> torch.Tensor:
    """float32 values of a quantized weight from its output tensors."""
    names = output_names(name, fmt)
    if fmt.is_fp8_block:
        return dequantize_fp8_block_reference(tensors[name], tensors[names[1]], dtype=torch.float32)
    if fmt.is_nvfp4:
        return dequantize_nvfp4_reference(NVFP4Weight(*(tensors[n] for n in names)))
    scale = tensors[names[1]]
    return tensors[name].float() * (scale.unsqueeze(-1) if fmt.per_channel else scale)

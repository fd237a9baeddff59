"""Test assertions: the bitwise comparisons of moeq_triton/testing.py (which say how much differs) and
checkpoint helpers."""

from __future__ import annotations

import copy
import os

import torch
from safetensors.torch import load_file

from moeq_triton.testing import as_bytes, assert_bitwise_equal, assert_results_equal, bitwise_mismatch  # noqa: F401


def checkpoint_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a checkpoint directory."""
    tensors = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, f)))
    return tensors


def config_without(config: dict, keys: tuple[str, ...] = ("producer",)) -> dict:
    """A config.json / hf_quant_config.json without fields that name the writer (top level and quantization)."""
    config = copy.deepcopy(config)
    for key in keys:
        config.pop(key, None)
        config.get("quantization_config", {}).pop(key, None)
    return config

"""Bitwise comparisons that say how much differs (pytest-free, so benchmarks can reuse them)."""

from __future__ import annotations

import copy
import os

import torch
from safetensors.torch import load_file


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A view of the raw bits, so NaN payloads and -0.0 compare exactly."""
    t = t.detach()
    if t.dtype in (torch.float8_e4m3fn, torch.uint8, torch.int8):
        return t.view(torch.uint8)
    if t.dim() == 0:
        t = t.reshape(1)
    return t.contiguous().view(torch.uint8)


def bitwise_mismatch(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> str | None:
    """None when dtype, shape and every bit agree, else a message that counts the differences."""
    if actual.dtype != expected.dtype:
        return f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.shape != expected.shape:
        return f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = as_bytes(actual.cpu()), as_bytes(expected.cpu())
    diff = (a != e).nonzero()
    if len(diff) == 0:
        return None
    first = tuple(diff[0].tolist())
    return (
        f"{what}: {len(diff)}/{a.numel()} bytes differ; first at byte {first}: "
        f"{a[first].item():#04x} != {e[first].item():#04x}"
    )


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    message = bitwise_mismatch(actual, expected, what)
    assert message is None, message


def assert_results_equal(actual, expected, what: str = "result") -> None:
    """Compare two NamedTuples of tensors (NVFP4Weight / FP8Weight) field by field."""
    assert type(actual) is type(expected), f"{what}: {type(actual).__name__} != {type(expected).__name__}"
    for field in actual._fields:
        assert_bitwise_equal(getattr(actual, field), getattr(expected, field), f"{what}.{field}")


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

"""What the benchmark scripts share with each other and with the tests: the expert shapes of real MoE models
(the tests shrink them) and bitwise comparisons that say how much differs (pytest-free).

Taken from the models' Hugging Face configs: fc1 is the fused gate+up projection [2 * moe_intermediate,
hidden] (Megatron's linear_fc1), fc2 the down projection [hidden, moe_intermediate].  Not shipped in the
wheel: only the benchmarks and the tests use it (pytest puts the repository root on sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    name: str
    hidden: int
    moe_intermediate: int
    experts: int
    moe_layers: int

    @property
    def fc1(self) -> tuple[int, int]:
        return (2 * self.moe_intermediate, self.hidden)

    @property
    def fc2(self) -> tuple[int, int]:
        return (self.hidden, self.moe_intermediate)


QWEN3_30B_A3B = MoEShape(name="Qwen3-30B-A3B", hidden=2048, moe_intermediate=768, experts=128, moe_layers=48)
QWEN3_235B_A22B = MoEShape(name="Qwen3-235B-A22B", hidden=4096, moe_intermediate=1536, experts=128, moe_layers=94)
DEEPSEEK_V3 = MoEShape(name="DeepSeek-V3", hidden=7168, moe_intermediate=2048, experts=256, moe_layers=58)

MODEL_SHAPES = (QWEN3_30B_A3B, QWEN3_235B_A22B, DEEPSEEK_V3)


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

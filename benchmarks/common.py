"""What the benchmark scripts share (and the tests borrow, shrunk): the expert shapes of real MoE models.

Taken from the models' Hugging Face configs: fc1 is the fused gate+up projection [2 * moe_intermediate,
hidden] (Megatron's linear_fc1), fc2 the down projection [hidden, moe_intermediate].  Not shipped in the
wheel: only the benchmarks and the tests use it (pytest puts the repository root on sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
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


QWEN3_30B_A3B = MoEShape("Qwen3-30B-A3B", hidden=2048, moe_intermediate=768, experts=128, moe_layers=48)
QWEN3_235B_A22B = MoEShape("Qwen3-235B-A22B", hidden=4096, moe_intermediate=1536, experts=128, moe_layers=94)
DEEPSEEK_V3 = MoEShape("DeepSeek-V3", hidden=7168, moe_intermediate=2048, experts=256, moe_layers=58)

MODEL_SHAPES = (QWEN3_30B_A3B, QWEN3_235B_A22B, DEEPSEEK_V3)

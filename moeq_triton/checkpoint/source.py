"""How the tensors of a batch of plan units are read from the source, ready for the kernels.

Kept here, apart from planning, because reading is where source layouts are undone: a block-scaled FP8
weight (sibling ``weight_scale_inv``) that is quantized goes to the kernels as an ``FP8BlockSource`` (codes
and scales; the kernels compute on its bf16 values without a bf16 copy), one that is kept becomes bf16.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moeq_triton.checkpoint.io import SAFETENSORS_DTYPES, CheckpointError
from moeq_triton.kernels import FP8BlockSource, dequantize_fp8_block
from moeq_triton.kernels.grouping import validate

SCALE_INV = "_scale_inv"
"""Suffix of an FP8-block source's scale: ``X.weight`` is dequantized with ``X.weight_scale_inv``."""


def fp8_block_scales(names: Iterable[str]) -> dict[str, str]:
    """weight name -> its ``weight_scale_inv`` name, for every block-scaled FP8 tensor of a source."""
    present = set(names)
    return {
        n.removesuffix(SCALE_INV): n for n in present if n.endswith(SCALE_INV) and n.removesuffix(SCALE_INV) in present
    }


@dataclass(frozen=True, kw_only=True)
class ExpertSlice:
    """One expert's 2-D weight inside a stacked [E, out, in] tensor on disk (Qwen3.5's released layout)."""

    stacked: str  # the tensor's name on disk
    expert: int
    rows: tuple[int, int]  # [start, end) of the expert's out rows: gate = first half of gate_up_proj
    shape: tuple[int, int]
    dtype: str  # safetensors spelling

    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * SAFETENSORS_DTYPES[self.dtype].itemsize


def split_experts(source, is_split) -> dict[str, ExpertSlice]:
    """Per-expert names (``experts.{e}.gate_proj.weight`` ...) of every stacked tensor ``is_split`` accepts."""
    out = {}
    for name in source.names():
        if not is_split(name):
            continue
        shape, dtype = source.shape_dtype(name)
        if len(shape) != 3:
            raise CheckpointError(
                f"{source.where(name)}: stacked expert tensor {name} has shape {list(shape)}, expected 3-D"
            )
        experts, rows, cols = shape
        base, _, projection = name.rpartition(".")
        if projection == "gate_up_proj" and rows % 2:
            raise CheckpointError(
                f"{source.where(name)}: stacked expert tensor {name} has {rows} rows: it holds gate and up, "
                "an even count (the engines split it in halves)"
            )
        parts = (("gate_proj", 0, rows // 2), ("up_proj", rows // 2, rows)) if projection == "gate_up_proj" else (
            (projection, 0, rows),)  # fmt: skip
        for e in range(experts):
            for leaf, start, end in parts:
                out[f"{base}.{e}.{leaf}.weight"] = ExpertSlice(
                    stacked=name, expert=e, rows=(start, end), shape=(end - start, cols), dtype=dtype
                )
    return out


def _read_slice(source, piece: ExpertSlice) -> torch.Tensor:
    """Only the expert's rows are read (safetensors slices lazily)."""
    from safetensors import safe_open

    path = source.path / source.weight_map[piece.stacked]
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_slice(piece.stacked)[piece.expert, piece.rows[0] : piece.rows[1]]


def read_units(units, source, device: torch.device) -> dict[str, torch.Tensor | FP8BlockSource]:
    """Every tensor of ``units`` on ``device`` (memory: the batch, never the model). An FP8-block weight of a
    quantized unit stays FP8 (an ``FP8BlockSource``: the kernels read it fused); a kept one becomes bf16."""
    loaded = {
        n: (_read_slice(source, unit.slices[n]) if n in unit.slices else source.tensor(n)).to(device)
        for unit in units
        for n in unit.names
    }
    for unit in units:
        for name, inv in unit.scale_inv.items():
            try:
                weight = FP8BlockSource(loaded[name], source.tensor(inv).to(device))
                validate([weight])  # the kernels' check of a source: layout, scale shape, one device
                loaded[name] = weight if unit.quantize else dequantize_fp8_block([weight.codes], [weight.scale_inv])[0]
            except ValueError as error:
                raise CheckpointError(f"{source.where(name)}: tensor {name}: {error}") from None
    return loaded


def dense(weight: torch.Tensor | FP8BlockSource) -> torch.Tensor:
    """A loaded weight as a tensor (an FP8-block source dequantized: for the few callers that need values)."""
    return weight.dequantize() if isinstance(weight, FP8BlockSource) else weight

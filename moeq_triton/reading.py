"""How the tensors of a batch of plan units are read from the source, ready for the kernels.

Kept here, apart from planning, because reading is where source layouts are undone: a block-scaled FP8
weight (sibling ``weight_scale_inv``) becomes bf16 right before its batch is quantized or written.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .checkpoint_io import CheckpointError
from .kernels import dequantize_fp8_block

SCALE_INV = "_scale_inv"
"""Suffix of an FP8-block source's scale: ``X.weight`` is dequantized with ``X.weight_scale_inv``."""


def fp8_block_scales(names: Iterable[str]) -> dict[str, str]:
    """weight name -> its ``weight_scale_inv`` name, for every block-scaled FP8 tensor of a source."""
    present = set(names)
    return {
        n.removesuffix(SCALE_INV): n for n in present if n.endswith(SCALE_INV) and n.removesuffix(SCALE_INV) in present
    }


def read_units(units, source, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of ``units`` on ``device``; FP8-block tensors dequantized to bf16 as they arrive (memory:
    the batch, never the model)."""
    loaded = {n: source.tensor(n).to(device) for unit in units for n in unit.names}
    for unit in units:
        for name, inv in unit.scale_inv.items():
            try:
                (loaded[name],) = dequantize_fp8_block([loaded[name]], [source.tensor(inv).to(device)])
            except ValueError as error:
                raise CheckpointError(f"{source.where(name)}: tensor {name}: {error}") from None
    return loaded

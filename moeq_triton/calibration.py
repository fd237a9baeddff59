"""The triton_grouped calibrator and the grouped reduction of a batch of recorded weights.

A calibration pass records (quantizer, weight) pairs in a ``WeightBatch``; ``WeightBatch.reduce`` turns
them into every quantizer's amax with one grouped launch per dtype, shares amaxes within a scale family
in the shared mode, and reduces them across ranks with one collective per process group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from modelopt.torch.quantization.calib import MaxCalibrator

from .collectives import Group, SyncItem, max_reduce
from .kernels import NonFiniteWeightError, grouped_amax, grouped_row_amax
from .modelopt_backend import CALIBRATOR


class TritonGroupedCalibrator(MaxCalibrator):
    """A ``MaxCalibrator`` whose weights are reduced by the whole-model grouped pass.

    The grouped pass writes ``_calib_amax`` directly (see ``weight_calibration``).  A tensor fed
    outside that pass (a forward loop, a per-module ModelOpt algorithm) goes through ModelOpt's own
    ``collect``, which keeps the max with what is there: a shared family amax stays the family max
    when the same weight comes again, and a value that grows is marked for ModelOpt's own sync.
    """

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, shared: bool = False):
        super().__init__(num_bits, axis, unsigned)
        self.shared = shared
        self.synced = False  # True while its amax is the one our cross-rank reduction produced

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        before = self._calib_amax
        super().collect(x)
        if self.synced and not (before is not None and torch.equal(before, self._calib_amax)):
            self.synced = False  # a new value: ModelOpt's per-quantizer sync must run again

    def reset(self) -> None:
        self.synced = False
        super().reset()


def is_triton_grouped(quantizer) -> bool:
    return isinstance(getattr(quantizer, "_calibrator", None), TritonGroupedCalibrator)


def groupable_axis(axis, weight: torch.Tensor) -> bool:
    """Per tensor (axis None) or per output channel of a 2-D weight (axis 0)."""
    return axis is None or (axis in (0, -2, (0,), [0]) and weight.dim() == 2)


_EXPERT_INDEX = re.compile(r"(?<=experts)\.\d+(?=\.)|\.\d+$")


def scale_family(quantizer_name: str) -> str:
    """Quantizers of one grouped linear share a family: the expert index becomes '*'.

    'layers.0.mlp.experts.linear_fc1.weight_quantizer.3' (TE GroupedLinear),
    'layers.0.mlp.experts.gate_up_proj_weight_quantizers.3' (HF fused experts) and
    'layers.0.mlp.experts.local_experts.3.linear_fc1.weight_quantizer' (SequentialMLP) all drop the 3.
    """
    return _EXPERT_INDEX.sub(".*", quantizer_name)


@dataclass
class StatRow:
    """One line of the quantization statistics table."""

    quantizer: str
    shapes: list[tuple[int, ...]]
    amax: float | None  # max over the (per-channel) amax; None when no weight reached the quantizer


@dataclass
class Calibrated:
    """What a quantizer receives: its amax in float32, per tensor (0-dim) or per channel ([N, 1])."""

    quantizer: torch.nn.Module
    name: str
    amax: torch.Tensor
    dtype: torch.dtype  # the weight's dtype: MaxCalibrator keeps it (the max of bf16 values is exact)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    groups: tuple[Group, ...] = ()


class WeightBatch:
    """The (quantizer, weight) pairs of one calibration pass, in the order ModelOpt yields them."""

    def __init__(self) -> None:
        self.per_tensor: list[tuple[Calibrated, torch.Tensor]] = []
        self.per_channel: list[tuple[Calibrated, torch.Tensor]] = []
        self.by_quantizer: dict[int, Calibrated] = {}

    def add(self, quantizer, name: str, weight: torch.Tensor, axis, groups: tuple[Group, ...]) -> None:
        entry = self.by_quantizer.get(id(quantizer))
        if entry is None:
            entry = Calibrated(quantizer, name, torch.empty(0), weight.dtype, groups=groups)
            self.by_quantizer[id(quantizer)] = entry
        entry.shapes.append(tuple(weight.shape))
        (self.per_tensor if axis is None else self.per_channel).append((entry, weight.detach()))

    @torch.no_grad()
    def reduce(self, member_of: tuple[Group, ...] | None) -> list[Calibrated]:
        """Every quantizer's amax: one grouped launch per dtype and kind, then family and rank reductions.

        member_of: the process groups of this rank (None: no cross-rank reduction).
        """
        for pairs, reduce, per_channel in (
            (self.per_tensor, grouped_amax, False),
            (self.per_channel, grouped_row_amax, True),
        ):
            if not pairs:
                continue
            try:
                amaxes = reduce([weight for _, weight in pairs])
            except NonFiniteWeightError as error:
                entry, weight = pairs[error.index]
                raise ValueError(
                    f"weight of {entry.name} (shape {tuple(weight.shape)}) contains NaN or Inf"
                ) from None
            for (entry, _), amax in zip(pairs, amaxes):
                amax = amax.reshape(-1, 1) if per_channel else amax
                entry.amax = amax if entry.amax.numel() == 0 else torch.maximum(entry.amax, amax)
        entries = list(self.by_quantizer.values())
        families = _share_within_families(entries)
        if member_of is not None:
            _reduce_across_ranks(entries, families, member_of)
        return entries


def _share_within_families(entries: list[Calibrated]) -> dict[str, list[Calibrated]]:
    """Shared mode: every per-tensor amax of a family becomes the family's max; returns the families."""
    families: dict[str, list[Calibrated]] = {}
    for entry in entries:
        if entry.quantizer._calibrator.shared and entry.amax.dim() == 0:
            families.setdefault(scale_family(entry.name), []).append(entry)
    for members in families.values():
        shared = torch.stack([e.amax for e in members]).amax()
        for e in members:
            e.amax = shared
    return families


def _reduce_across_ranks(
    entries: list[Calibrated], families: dict[str, list[Calibrated]], member_of: tuple[Group, ...]
) -> None:
    """One SyncItem per quantizer (or per shared family), one collective per process group."""
    in_family = {id(e) for members in families.values() for e in members}
    singles = [e for e in entries if id(e) not in in_family]
    items = [SyncItem(e.name, e.amax, e.groups) for e in singles]
    family_items = [
        SyncItem(f"family:{family}", members[0].amax, tuple(dict.fromkeys(g for e in members for g in e.groups)))
        for family, members in families.items()
    ]
    max_reduce([*items, *family_items], member_of)
    for entry, item in zip(singles, items):
        entry.amax = item.value
    for members, item in zip(families.values(), family_items):
        for e in members:
            e.amax = item.value


def stat_rows(entries: list[Calibrated], missing: list[str]) -> list[StatRow]:
    values = torch.stack([e.amax.amax() for e in entries]).tolist() if entries else []  # one host sync
    rows = [StatRow(e.name, e.shapes, v) for e, v in zip(entries, values)]
    return rows + [StatRow(name, [], None) for name in missing]


class _LastStats:
    """The statistics table of the most recent grouped calibration (for ``calibration_stats``)."""

    rows: list[StatRow] = []


def set_last_stats(rows: list[StatRow]) -> None:
    _LastStats.rows = rows


def calibration_stats() -> list[StatRow]:
    """Rows of the last grouped calibration: quantizer name, weight shape(s), amax."""
    return list(_LastStats.rows)


def format_stats(rows: list[StatRow] | None = None):
    """A rich Table of the statistics (quantizer, weight shape, amax), like ModelOpt PR #971 shows."""
    from rich.table import Table

    rows = calibration_stats() if rows is None else rows
    table = Table(title=f"Weight calibration ({CALIBRATOR}): {len(rows)} quantizers")
    table.add_column("quantizer")
    table.add_column("weight shape")
    table.add_column("amax", justify="right")
    for row in rows:
        shape = ", ".join(str(list(s)) for s in row.shapes) or "no weight"
        table.add_row(row.quantizer, shape, "-" if row.amax is None else f"{row.amax:.4e}")
    return table

"""The triton_grouped calibrator and the grouped reduction of a batch of recorded weights.

A calibration pass records (quantizer, weight) pairs in a ``WeightBatch``; ``WeightBatch.reduce`` turns
them into every quantizer's amax with one grouped launch per dtype, shares amaxes within a scale group
in the shared mode, and reduces them across ranks with one collective per process group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from modelopt.torch.quantization.calib import MaxCalibrator

from moeq_triton.distributed import Group, SyncItem, max_reduce
from moeq_triton.kernels import NonFiniteWeightError, grouped_amax, grouped_row_amax
from moeq_triton.modelopt.names import CALIBRATOR
from moeq_triton.modelopt.patches import calibrator, calibrator_amax


class TritonGroupedCalibrator(MaxCalibrator):
    """A ``MaxCalibrator`` whose weights are reduced by the whole-model grouped pass.

    The grouped pass writes ``_calib_amax`` directly (see ``weight_calibration``).  A tensor fed
    outside that pass (a forward loop, a per-module ModelOpt algorithm) goes through ModelOpt's own
    ``collect``, which keeps the max with what is there: a shared scale group's amax stays the group max
    when the same weight comes again, and a value that grows is marked for ModelOpt's own sync.
    """

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False, shared: bool = False):
        super().__init__(num_bits, axis, unsigned)
        self.shared = shared
        self.synced = False  # True while its amax is the one our cross-rank reduction produced

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        before = calibrator_amax(self)
        super().collect(x)
        if self.synced and not (before is not None and torch.equal(before, calibrator_amax(self))):
            self.synced = False  # a new value: ModelOpt's per-quantizer sync must run again

    def reset(self) -> None:
        self.synced = False
        super().reset()


def reduction_view(axis, weight: torch.Tensor) -> torch.Tensor | None:
    """The tensor whose grouped amax is this quantizer's amax of ``weight``: the same elements, no copy.

    Per tensor (axis None): ``weight`` itself when its last dim has stride 1 (the kernels' contract),
    else the permutation of its dims that is contiguous, if any (ModelOpt feeds Llama-4's and
    GPT-OSS's stacked experts [E, in, out] as the transposed view [E, out, in]; the max of every
    element does not depend on their order).  Per channel (an axis that keeps dim 0 only, ModelOpt's
    ``convert_quantization_axis_to_reduce_axis``): ``weight`` when 2-D with the last dim at stride 1
    (one row per channel), else dims 1.. permuted to be contiguous behind dim 0 and viewed as
    [channels, -1] (each row holds exactly the elements of one channel).  None: no such view (another
    axis, a strided or overlapping layout); ModelOpt's own forward collects that weight instead.
    """
    if axis is None:
        return weight if weight.dim() == 0 or weight.stride(-1) == 1 else _contiguous_permutation(weight, 0)
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    dims = weight.dim()
    if [i for i in range(dims) if i in axes or i - dims in axes] != [0]:
        return None
    if dims == 2 and weight.stride(-1) == 1:
        return weight
    dense = _contiguous_permutation(weight, 1)
    return None if dense is None else dense.view(weight.shape[0], -1)


def _contiguous_permutation(weight: torch.Tensor, fixed: int) -> torch.Tensor | None:
    """``weight`` with its dims from ``fixed`` on reordered by decreasing stride, if that view is contiguous."""
    order = sorted(range(fixed, weight.dim()), key=lambda d: -weight.stride(d))
    view = weight.permute(*range(fixed), *order)
    return view if view.is_contiguous() else None


_EXPERT_INDEX = re.compile(r"(?<=experts)\.\d+(?=\.)|\.\d+$")


def shared_scale_group(quantizer_name: str) -> str:
    """Quantizers of one grouped linear form one scale group in the shared mode: the expert index becomes '*'.

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


@dataclass(kw_only=True)
class Calibrated:
    """One quantizer of a batch and, after ``reduce``, its amax in the weight's dtype."""

    quantizer: torch.nn.Module
    name: str
    dtype: torch.dtype  # the weight's dtype: MaxCalibrator keeps it (the max of bf16 values is exact)
    per_channel: bool
    groups: tuple[Group, ...] = ()
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    amax: torch.Tensor | None = None  # 0-dim per tensor, [N, 1, ...] per channel (keepdims); own storage


class WeightBatch:
    """The (quantizer, weight) pairs of one calibration pass, in the order ModelOpt yields them."""

    def __init__(self) -> None:
        self.entries: list[Calibrated] = []
        self._index: dict[int, int] = {}  # id(quantizer) -> position in entries
        self._singles: list[torch.Tensor] = []  # per-tensor weights: grouped_amax
        self._single_entry_of: list[int] = []
        # grouped_row_amax inputs: a per-channel weight (entry_of: its entry) or a stack of per-tensor
        # expert weights viewed as [experts, -1] (entry_of: one entry per row)
        self._rows: list[torch.Tensor] = []
        self._row_entry_of: list[int | list[int]] = []
        self._row_shapes: list[tuple[int, ...] | None] = []  # a per-channel weight's keepdims amax shape
        # amaxes of weights already reduced (``settle``): per-tensor values and their entries, per channel
        self._values: list[torch.Tensor] = []
        self._entry_of: list[int] = []
        self._per_channel: dict[int, torch.Tensor] = {}

    def _entry(self, quantizer, name: str, weight: torch.Tensor, per_channel: bool, groups: tuple[Group, ...]) -> int:
        index = self._index.get(id(quantizer))
        if index is None:
            index = self._index[id(quantizer)] = len(self.entries)
            self.entries.append(
                Calibrated(quantizer=quantizer, name=name, dtype=weight.dtype, per_channel=per_channel, groups=groups)
            )
        self.entries[index].shapes.append(tuple(weight.shape))
        return index

    def add(self, quantizer, name: str, weight: torch.Tensor, *, per_channel: bool, groups: tuple[Group, ...]) -> None:
        """A weight as ModelOpt feeds it; per_channel: its quantizer's axis keeps dim 0 only.  The caller
        checked ``reduction_view`` (it is reduced through that view; its shape is what is recorded)."""
        index = self._entry(quantizer, name, weight, per_channel, groups)
        view = reduction_view(0 if per_channel else None, weight)
        if view is None:
            raise ValueError(f"weight of {name} (shape {tuple(weight.shape)}) has no copy-free reduction view")
        if per_channel:
            self._rows.append(view)
            self._row_entry_of.append(index)
            self._row_shapes.append((weight.shape[0],) + (1,) * (weight.dim() - 1))
        else:
            self._singles.append(view)
            self._single_entry_of.append(index)

    def add_stack(self, pairs: list[tuple], stacked: torch.Tensor) -> None:
        """Per-tensor weights that are the consecutive slices ``stacked[i]`` of one contiguous parameter:
        taken whole, as the rows of ``stacked.view(len(pairs), -1)`` (one table entry, not one per expert).

        pairs: (quantizer, name, weight, groups) for i = 0 .. len(pairs) - 1.
        """
        entry_of = [self._entry(q, name, weight, False, groups) for q, name, weight, groups in pairs]
        self._rows.append(stacked.view(len(pairs), -1))
        self._row_entry_of.append(entry_of)
        self._row_shapes.append(None)

    @torch.no_grad()
    def reduce(self, member_of: tuple[Group, ...] | None) -> list[Calibrated]:
        """Every quantizer's amax: one grouped launch per dtype and kind, then scale-group and rank reductions.

        member_of: the process groups of this rank (None: no cross-rank reduction).
        """
        per_tensor, per_channel = self._amaxes()
        groups = _share_within_scale_groups(self.entries, per_tensor)
        if member_of is not None:
            _reduce_across_ranks(self.entries, per_tensor, per_channel, groups, member_of)
        by_dtype = {dtype: per_tensor.to(dtype) for dtype in {e.dtype for e in self.entries if not e.per_channel}}
        for i, entry in enumerate(self.entries):
            if entry.per_channel:
                entry.amax = per_channel[i].to(entry.dtype)
            else:
                entry.amax = by_dtype[entry.dtype][i].clone()  # its own storage, as ModelOpt's setter clones
        return self.entries

    def settle(self) -> None:
        """Reduce the weights recorded so far and drop every reference to them, keeping only their
        float32 amaxes.  Under a weight-access hook (offload, FSDP2) a weight is materialized only
        inside its module's context: settling there bounds memory by one module, not the model."""
        singles = self._launch(grouped_amax, self._singles, self._single_entry_of)
        rows = self._launch(grouped_row_amax, self._rows, self._row_entry_of)
        if singles is not None:
            self._values.append(singles)
            self._entry_of += self._single_entry_of
        for entry_of, shape, amax in zip(self._row_entry_of, self._row_shapes, rows or []):
            if isinstance(entry_of, list):
                self._values.append(amax)
                self._entry_of += entry_of
            else:
                amax = amax.reshape(shape)
                known = self._per_channel.get(entry_of)
                self._per_channel[entry_of] = amax if known is None else torch.maximum(known, amax)
        self._singles, self._single_entry_of = [], []
        self._rows, self._row_entry_of, self._row_shapes = [], [], []

    def _amaxes(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """float32 [len(entries)] (the max over every weight fed to each per-tensor quantizer, 0 elsewhere)
        and float32 [N, 1, ...] (ModelOpt's keepdims shape) per per-channel quantizer, by position in entries."""
        self.settle()
        values, entry_of = self._values, self._entry_of
        device = next((t.device for t in (*values, *self._per_channel.values())), torch.device("cpu"))
        per_tensor = torch.zeros(len(self.entries), dtype=torch.float32, device=device)
        if values:  # amaxes are >= +0, so the zeros never win over a real value
            index = torch.tensor(entry_of, device=device)
            per_tensor.scatter_reduce_(0, index, torch.cat(values), reduce="amax")
        return per_tensor, self._per_channel

    def _launch(self, reduce, weights: list[torch.Tensor], entry_of: list) -> torch.Tensor | list | None:
        if not weights:
            return None
        try:
            return reduce(weights)
        except NonFiniteWeightError as error:
            weight, entries = weights[error.index], entry_of[error.index]
            if isinstance(entries, list):  # a stack: name the expert whose row holds the NaN/Inf
                row = int((~torch.isfinite(weight).all(dim=1)).nonzero()[0])
                entry = self.entries[entries[row]]
                shape = entry.shapes[0]
            else:
                entry, shape = self.entries[entries], tuple(weight.shape)
            raise ValueError(f"weight of {entry.name} (shape {shape}) contains NaN or Inf") from None


def _share_within_scale_groups(entries: list[Calibrated], per_tensor: torch.Tensor) -> dict[str, list[int]]:
    """Shared mode: every per-tensor amax of a scale group becomes the group's max; returns the groups."""
    groups: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        if not entry.per_channel and calibrator(entry.quantizer).shared:
            groups.setdefault(shared_scale_group(entry.name), []).append(i)
    for members in groups.values():
        index = torch.tensor(members, device=per_tensor.device)
        per_tensor[index] = per_tensor[index].amax()
    return groups


def _reduce_across_ranks(
    entries: list[Calibrated],
    per_tensor: torch.Tensor,
    per_channel: dict[int, torch.Tensor],
    groups: dict[str, list[int]],
    member_of: tuple[Group, ...],
) -> None:
    """One SyncItem per quantizer (or per shared scale group), one collective per process group."""
    in_group = {i for members in groups.values() for i in members}
    singles = [i for i in range(len(entries)) if i not in in_group]
    items = [
        SyncItem(entries[i].name, per_channel[i] if entries[i].per_channel else per_tensor[i], entries[i].groups)
        for i in singles
    ]
    group_items = [
        SyncItem(
            f"scale group:{group}",
            per_tensor[members[0]],
            tuple(dict.fromkeys(g for i in members for g in entries[i].groups)),
        )
        for group, members in groups.items()
    ]
    max_reduce([*items, *group_items], member_of)
    for i, item in zip(singles, items):
        if entries[i].per_channel:
            per_channel[i] = item.value
        else:
            per_tensor[i] = item.value
    for members, item in zip(groups.values(), group_items):
        per_tensor[torch.tensor(members, device=per_tensor.device)] = item.value


class _LastStats:
    """The most recent grouped calibration, kept as (name, shapes, amax) until a table is asked for."""

    rows: list[tuple[str, list[tuple[int, ...]], torch.Tensor | None]] = []


def set_last_stats(entries: list[Calibrated], missing: list[str]) -> None:
    _LastStats.rows = [(e.name, e.shapes, e.amax) for e in entries] + [(name, [], None) for name in missing]


def calibration_stats() -> list[StatRow]:
    """Rows of the last grouped calibration: quantizer name, weight shape(s), amax (max over channels)."""
    rows = _LastStats.rows
    present = [amax.float().amax() for _, _, amax in rows if amax is not None]
    values = iter(torch.stack(present).tolist() if present else [])  # one host sync
    return [StatRow(name, list(shapes), None if amax is None else next(values)) for name, shapes, amax in rows]


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

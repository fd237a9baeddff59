"""The multi-rank job that writes a quantized checkpoint: written once, run by the command and the exporter.

``moeq-triton quantize`` (``checkpoint.quantize``) and ``export_hf`` (``export.hf``) do the same thing from
a plan: open the destination on every rank in agreement, produce every output shard batch by batch (grouped
kernel calls per batch, kept tensors carried, ``Stats`` counted), write the metadata and commit; a failure
on any rank, in any step, aborts the partial output on every rank, and no rank is left waiting.  They differ
only in a ``Feed``: which shards a rank takes part in, where a batch's tensors come from (a
``SourceCheckpoint`` read ahead by a thread, or a model's tensor-parallel slices joined point to point), who
quantizes a unit, and whether a shard's outputs are gathered to rank 0 or written by the rank that made them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from moeq_triton import distributed
from moeq_triton.checkpoint.formats import Format, dequantize, output_layout, output_names
from moeq_triton.checkpoint.io import (
    SAFETENSORS_DTYPES,
    AtomicCheckpointDir,
    CheckpointError,
    SourceCheckpoint,
    shard_name,
)
from moeq_triton.checkpoint.source import ExpertSlice, dense
from moeq_triton.kernels import (
    NonFiniteWeightError,
    NVFP4Weight,
    grouped_amax,
    quantize_fp8,
    quantize_fp8_block,
    quantize_nvfp4,
)

BATCH_BYTES = 256 << 20
"""Default bytes of one batch held in memory (dequantized size): the command's ``--batch-size``, the exporter's
``batch_bytes``; the tensors quantized together in one group of kernel launches."""

# ---------------------------------------------------------------- what a job is


@dataclass(kw_only=True)
class Unit:
    """Tensors read and processed together: one scale group, or one kept tensor."""

    names: list[str]
    quantize: bool
    in_bytes: int  # source bytes (FP8-block scales included)
    out_bytes: int
    scale_inv: dict[str, str] = field(default_factory=dict)  # FP8-block source: weight -> its weight_scale_inv
    load_bytes: int = 0  # bytes held once read (kept FP8-block weights dequantized to bf16); 0: in_bytes
    transposed: bool = False  # stacked [E, in, out] experts: quantized along ``in``, written back as [E, ., out]
    slices: dict[str, ExpertSlice] = field(default_factory=dict)  # per-expert names read from a stacked tensor

    @property
    def held_bytes(self) -> int:
        return self.load_bytes or self.in_bytes


@dataclass(kw_only=True)
class Plan:
    fmt: Format | None  # None: an unquantized export (every tensor kept as it is)
    shards: list[list[Unit]]
    exclude_modules: list[str]
    split: dict[str, ExpertSlice] = field(default_factory=dict)  # per-expert names of stacked source tensors
    warnings: list[str] = field(default_factory=list)  # odd but loadable: said at the end of the run

    @property
    def units(self) -> list[Unit]:
        return [u for shard in self.shards for u in shard]

    def source_layout(self, source: SourceCheckpoint, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and safetensors dtype of a planned source tensor (a per-expert slice included)."""
        piece = self.split.get(name)
        return (piece.shape, piece.dtype) if piece else source.shape_dtype(name)


@dataclass(kw_only=True)
class Stats:
    quantized: int = 0
    kept: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: list[tuple[float, float]] = field(default_factory=list)  # (max, mean) relative error per sample
    nonfinite_kept: list[str] = field(default_factory=list)  # kept tensors carried through with NaN/Inf
    all_zero: int = 0  # quantized tensors whose every value is zero (written as the exact-zero encoding)
    warnings: list[str] = field(default_factory=list)  # odd but loadable: said once at the end


class Feed:
    """What differs between the command and the exporter, for one rank; the defaults are the command's
    "each rank works alone on whole shards" (the subclass says where tensors come from: ``batches``).

    ``source``: what the plan was made from (``where`` names a tensor's origin in errors)."""

    def __init__(self, source: Any, advance: Callable[[int], None] = lambda n: None) -> None:
        self.source = source
        self.advance = advance

    def shards(self, plan: Plan) -> Iterable[int]:
        """The shards this rank takes part in, in the order every rank follows."""
        rank, world = distributed.rank_world()
        return range(rank, len(plan.shards), world)

    def batches(self, batches: list[list[Unit]]) -> Iterator[tuple[list[Unit], dict[str, Any]]]:
        """Per batch of a shard: the units this rank quantizes and their tensors, loaded."""
        raise NotImplementedError

    def step(self, run: Callable[[], object], what: str) -> None:
        """One step of a shard; a step other ranks wait on runs through ``distributed.together``."""
        run()

    @contextmanager
    def shard_output(self, out: AtomicCheckpointDir, plan: Plan, s: int) -> Iterator[Callable[[dict], None]]:
        """Where a batch's outputs go while shard ``s`` is produced: here, straight into the shard's file
        (``open_shard``: this rank made every tensor of it, and a writer thread writes one batch while the
        next is quantized, so the shard is never assembled in memory)."""
        with out.open_shard(shard_name(s, len(plan.shards)), shard_layout(plan, self.source, plan.shards[s])) as file:
            yield file.write


# ---------------------------------------------------------------- the job


def run_job(
    prepare: Callable[[], tuple[Plan, Any, AtomicCheckpointDir]],
    feed: Callable[[Plan, Any], Feed],
    *,
    preparing: str,
    batch_bytes: int = BATCH_BYTES,
    allow_nonfinite_kept: bool = False,
    on_commit: Callable[[], None] = lambda: None,
) -> tuple[Plan, Stats]:
    """Prepare, produce every shard, write the metadata and commit, each step agreed by every rank.

    ``prepare`` (every rank) returns (plan, source, destination not yet created); rank 0 creates the
    destination.  A failure of any step on any rank raises on every rank (its own error, or a
    ``PeerFailure`` naming the rank) after rank 0 removed the partial output: the destination is left
    as it was.  ``on_commit`` runs as soon as the complete output is in place.  Returns the plan and
    this rank's ``Stats`` (its warnings include the plan's)."""
    rank = distributed.rank_world()[0]
    made: dict[str, Any] = {}

    def open_destination() -> None:
        made["plan"], made["source"], made["out"] = prepare()
        if rank == 0:
            made["out"].create()

    def produce() -> None:
        mine = feed(made["plan"], made["source"])
        made["stats"] = produce_shards(
            made["plan"], made["out"], mine, batch_bytes=batch_bytes, allow_nonfinite_kept=allow_nonfinite_kept
        )

    def finish() -> None:
        if rank == 0:
            write_metadata(made["plan"], made["source"], made["out"])
            made["out"].commit(on_commit)

    steps = ((open_destination, preparing), (produce, "quantizing and writing shards"), (finish, "writing metadata"))
    for step, what in steps:
        failure = distributed.agree(step, what)
        if failure is not None:
            if rank == 0 and "out" in made:
                made["out"].abort()
            raise failure
    distributed.barrier()
    stats: Stats = made["stats"]
    stats.warnings += made["plan"].warnings
    return made["plan"], stats


def produce_shards(
    plan: Plan, out: AtomicCheckpointDir, feed: Feed, *, batch_bytes: int = BATCH_BYTES,
    allow_nonfinite_kept: bool = False,
) -> Stats:  # fmt: skip
    """This rank's part of every shard it takes part in: batches quantized, each batch's outputs handed to the
    feed's ``shard_output`` (written as they come, or gathered and written at the shard's end).

    The command holds at most three batches at a time (one read ahead, one in work, the previous one's output
    being written); the exporter its slices, one joined batch and its part of one output shard."""
    stats = Stats()
    for s in feed.shards(plan):
        with feed.shard_output(out, plan, s) as store:
            for units, loaded in feed.batches(batch_plan(plan.shards[s], batch_bytes)):
                allow = allow_nonfinite_kept
                batch = partial(quantize_batch, units, loaded, plan, stats, feed=feed, allow_nonfinite_kept=allow)
                feed.step(partial(_store, store, batch), "quantizing")
    return stats


def _store(store: Callable[[dict], None], make: Callable[[], dict[str, torch.Tensor]]) -> None:
    store(make())


def quantize_batch(
    units: list[Unit],
    loaded: dict[str, Any],
    plan: Plan,
    stats: Stats,
    *,
    feed: Feed,
    allow_nonfinite_kept: bool = False,
) -> dict[str, torch.Tensor]:
    """One batch: its quantized units in grouped kernel calls, its kept tensors carried (checked for NaN/Inf in
    one grouped amax call, carried with ``allow_nonfinite_kept``), ``stats`` counted (one sampled relative
    error per batch).  Returns every output tensor of ``units``, on the CPU."""
    quantized = [u for u in units if u.quantize]
    zero: list[str] = []
    result = quantize_units(quantized, loaded, plan.fmt, feed.source, all_zero=zero)
    stats.all_zero += len(zero)
    sampled = next((u for u in quantized if not u.transposed), None)
    if sampled:
        sample = sampled.names[0]
        stats.errors.append(relative_error(dense(loaded[sample]), dequantize(result, sample, plan.fmt)))
    kept = [u.names[0] for u in units if not u.quantize]
    stats.nonfinite_kept += nonfinite_kept(kept, loaded, feed.source, allow_nonfinite_kept)
    result.update((name, loaded[name]) for name in kept)
    for unit in units:
        stats.quantized += len(unit.names) if unit.quantize else 0
        stats.kept += 0 if unit.quantize else 1
        stats.bytes_in += unit.in_bytes
        stats.bytes_out += unit.out_bytes
    feed.advance(sum(u.in_bytes for u in units))
    return {k: v.detach().cpu() for k, v in result.items()}


# ---------------------------------------------------------------- batches


def pack(units: list[Unit], budget: int, size_of: Callable[[Unit], int]) -> list[list[Unit]]:
    """Consecutive units in packs of at most ``budget`` bytes (a larger unit stands alone)."""
    packs: list[list[Unit]] = [[]]
    size = 0
    for unit in units:
        if packs[-1] and size + size_of(unit) > budget:
            packs.append([])
            size = 0
        packs[-1].append(unit)
        size += size_of(unit)
    return packs


def batch_plan(shard: list[Unit], batch_bytes: int) -> list[list[Unit]]:
    """The batches one shard is read in: at most ``batch_bytes`` held in memory each (dequantized size)."""
    return pack(shard, batch_bytes, lambda u: u.held_bytes)


def prefetched(batches: list[list[Unit]], load: Callable[[list[Unit]], dict[str, Any]]):
    """Yield (batch, its tensors) while a reader thread already loads the next batch (overlaps I/O and
    compute; at most two batches in memory)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(load, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            loaded = pending.result()
            pending = reader.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
            yield batch, loaded


# ---------------------------------------------------------------- quantizing a batch


def nonfinite_kept(names: list[str], loaded: dict[str, torch.Tensor], source: Any, allow: bool) -> list[str]:
    """Kept floating-point tensors holding NaN/Inf, found by one grouped amax call; an error naming the
    first (and how many) unless ``allow``."""
    checked = [n for n in names if loaded[n].dtype in (torch.bfloat16, torch.float16, torch.float32)]
    checked = [n for n in checked if loaded[n].numel()]
    bad: list[str] = []
    while checked:  # one call when all are finite; a failure re-checks only the tensors after it
        try:
            grouped_amax([loaded[n].reshape(1, -1) if loaded[n].dim() < 2 else loaded[n] for n in checked])
            break
        except NonFiniteWeightError as error:
            bad.append(checked[error.index])
            checked = checked[error.index + 1 :]
    bad += [n for n in names if loaded[n].dtype == torch.float64 and not bool(loaded[n].isfinite().all())]
    if bad and not allow:
        more = f" (and {len(bad) - 1} more kept tensors)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{source.where(bad[0])}: kept tensor {bad[0]} contains NaN or Inf{more}; "
            "pass --allow-nonfinite-kept to carry such tensors through"
        )
    return bad


def quantize_units(
    units: list[Unit],
    loaded: dict[str, torch.Tensor],
    fmt: Format,
    source: Any,
    *,
    all_zero: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Grouped kernel calls over every quantized tensor of a batch; shared amax per scale group.

    ``all_zero`` (when given) receives the names of the tensors whose every value is zero; an all-zero
    NVFP4 scale group is written as ``zero_nvfp4`` (finite bytes that dequantize to exact zeros)."""
    names = [n for u in units for n in u.names]
    if not names:
        return {}
    transposed = [u.transposed for u in units for _ in u.names]
    weights = [_stacked_input(dense(loaded[n]), fmt) if t else loaded[n] for n, t in zip(names, transposed)]
    if fmt.is_fp8_block:  # block amaxes are local to each 128x128 tile: no amax pass, no shared scale
        if any(transposed):
            name = names[transposed.index(True)]
            where = source.where(name)
            raise CheckpointError(f"{where}: {name} is a stacked expert tensor; fp8-block takes 2-D weights")
        try:
            results = quantize_fp8_block(weights)
        except NonFiniteWeightError as error:
            name = names[error.index]
            raise CheckpointError(f"{source.where(name)}: tensor {name} contains NaN or Inf") from None
        if all_zero is not None:  # a block's largest |w| is coded +-448: all codes zero <=> all values zero;
            # a block of amax 0 has scale 1.0, so only where every block scale is 1.0 are the codes looked at
            all_zero += [n for n, q in zip(names, results) if bool((q[1] == 1).all()) and not _any_code(q[0])]
        return {k: v for name, q in zip(names, results) for k, v in zip(output_names(name, fmt), q)}
    try:
        amax = grouped_amax(weights)
    except NonFiniteWeightError as error:
        name = names[error.index]
        raise CheckpointError(f"{source.where(name)}: tensor {name} contains NaN or Inf") from None
    unit_of = torch.tensor([i for i, u in enumerate(units) for _ in u.names], device=amax.device)
    scale_group_amax = torch.zeros(len(units), device=amax.device).scatter_reduce(0, unit_of, amax, "amax")[unit_of]
    zero = (scale_group_amax == 0).tolist()  # amax 0: every value of every member of the group is zero
    if all_zero is not None:
        all_zero += [n for n, z in zip(names, zero) if z]
    if fmt.is_nvfp4:
        results = [zero_nvfp4(q) if z else q for q, z in zip(quantize_nvfp4(weights, scale_group_amax), zero)]
    else:
        results = quantize_fp8(weights, None if fmt.per_channel else scale_group_amax, per_channel=fmt.per_channel)
    out: dict[str, torch.Tensor] = {}
    for name, t, q in zip(names, transposed, results):
        for output, tensor in zip(output_names(name, fmt), q):
            out[output] = tensor.transpose(-1, -2).contiguous() if t and tensor.dim() >= 2 else tensor
    return out


def _any_code(codes: torch.Tensor) -> bool:
    """Whether any float8_e4m3fn code is non-zero (-0.0, 0x80, counts as zero)."""
    return bool((codes.view(torch.uint8) & 0x7F).any())


def zero_nvfp4(q: NVFP4Weight) -> NVFP4Weight:
    """The encoding of an all-zero NVFP4 scale group: codes 0 (E2M1 +0), block scales 1.0 (what ModelOpt writes
    for a zero block inside a non-zero tensor) and weight_scale_2 1.0.  Every dequantized value is
    0 x 1.0 x 1.0 = +0 exactly, with no zero or NaN scale an engine could divide by.

    The one place where the bytes differ from ModelOpt's export: there amax 0 gives weight_scale_2 = 0 and
    block scales 0/0 = NaN (codes 0x77), so every engine computes NaN for the layer.  Done here, on the
    kernels' output, rather than in the kernels: the group's amax is known here, and a group is all-zero
    exactly when its amax is 0 (NaN/Inf raise before), so nothing else changes."""
    return NVFP4Weight(torch.zeros_like(q.weight), torch.ones_like(q.weight_scale), torch.ones_like(q.weight_scale_2))


def _stacked_input(weight: torch.Tensor, fmt: Format) -> torch.Tensor:
    """A stacked [E, in, out] expert tensor as the kernels take it: [E, out, in]. For FP8 also in float32:
    ModelOpt divides a 3-D weight by its scale unsqueezed to 1-D, which promotes the quotient to float32
    (one rounding, where a 2-D bf16 weight's quotient is rounded to bf16 first)."""
    weight = weight.transpose(-1, -2)
    return weight.contiguous() if fmt.is_nvfp4 else weight.float().contiguous()


def relative_error(original: torch.Tensor, values: torch.Tensor) -> tuple[float, float]:
    """Max and mean of |values - original| / max|original| (the figures the command and the demo report)."""
    err = (values.float() - original.float()).abs() / original.float().abs().amax().clamp_min(1e-30)
    return float(err.max()), float(err.mean())


# ---------------------------------------------------------------- writing


def write_shard(out: AtomicCheckpointDir, plan: Plan, s: int, tensors: dict[str, torch.Tensor]) -> None:
    """Output shard ``s`` of the plan, written into the partial destination in one call (all its tensors)."""
    out.write_shard(shard_name(s, len(plan.shards)), tensors)


def kept_layout(plan: Plan, source: Any, unit: Unit, name: str) -> tuple[tuple[int, ...], str]:
    """Shape and safetensors dtype of a kept tensor in the output (an FP8-block source tensor becomes BF16)."""
    shape, dtype = plan.source_layout(source, name)
    return (shape, "BF16") if name in unit.scale_inv else (shape, dtype)


def shard_layout(plan: Plan, source: Any, units: list[Unit]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every output tensor of ``units``: name -> (shape, safetensors dtype name), known before any is computed
    (a streamed shard's header; ``verify``'s expectations)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    layout: dict[str, tuple[tuple[int, ...], str]] = {}
    for unit in units:
        for name in unit.names:
            if not unit.quantize:
                layout[name] = kept_layout(plan, source, unit, name)
                continue
            layouts = output_layout(plan.source_layout(source, name)[0], plan.fmt, unit.transposed)
            for output, (shape, dtype) in zip(output_names(name, plan.fmt), layouts):
                layout[output] = (tuple(shape), names[dtype])
    return layout


def write_metadata(plan: Plan, source: SourceCheckpoint, out: AtomicCheckpointDir) -> None:
    """config.json with quantization_config, hf_quant_config.json, tokenizer/generation files, and
    last the index (its metadata records every file written: the manifest)."""
    weight_map: dict[str, str] = {}
    total = 0
    for s, shard in enumerate(plan.shards):
        for unit in shard:
            for name in unit.names:
                for output in output_names(name, plan.fmt) if unit.quantize else [name]:
                    weight_map[output] = shard_name(s, len(plan.shards))
            total += unit.out_bytes
    config = dict(source.config)
    if plan.fmt is not None:
        config["quantization_config"] = plan.fmt.quantization_config(plan.exclude_modules)
        hf_quant_config = plan.fmt.hf_quant_config(plan.exclude_modules)
        if hf_quant_config is not None:
            out.write_json("hf_quant_config.json", hf_quant_config)
    out.write_json("config.json", config)
    for extra in source.extra_files():
        out.copy_file(extra)
    out.write_index({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})

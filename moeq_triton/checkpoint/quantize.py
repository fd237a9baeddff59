"""Model-free quantization of a Hugging Face checkpoint, straight from its safetensors files.

Weight-only quantization needs no activations, so no model is built: the job is planned from tensor
names and shapes alone, then each output shard is produced by reading its source tensors once,
quantizing them in grouped kernel calls (scale groups such as an expert's gate/up are always read
together, so their shared amax needs no second pass) and writing the shard.  The plan is
deterministic, so N processes (torchrun) each produce whole shards and the result is the same files
a single process writes.  Here: the plan and the command's part (``CheckpointFeed``, ``verify``); the job
itself (agreement across ranks, batches, the grouped calls of a batch, commit or abort) is ``job.py``, which
``export_hf`` runs too.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence

import torch

from moeq_triton import distributed
from moeq_triton.checkpoint import job, serving
from moeq_triton.checkpoint.formats import Format, output_layout
from moeq_triton.checkpoint.io import (
    AtomicCheckpointDir,
    CheckpointError,
    SourceCheckpoint,
    new_run_id,
)
from moeq_triton.checkpoint.job import BATCH_BYTES, Feed, Plan, Stats, Unit, pack, quantize_units, shard_layout
from moeq_triton.checkpoint.source import fp8_block_scales, read_units, split_experts
from moeq_triton.naming import PASS, QUANTIZE, Decision, naming_for

QUANTIZABLE_DTYPES = ("BF16", "F16", "F32")


def _out_bytes(shape: tuple[int, ...], fmt: Format, transposed: bool = False) -> int:
    return sum(int(torch.Size(s).numel()) * d.itemsize for s, d in output_layout(shape, fmt, transposed))


def make_plan(
    source: SourceCheckpoint,
    fmt: Format | None,
    *,
    experts_only: bool,
    max_shard_bytes: int,
    exclude: tuple[str, ...] = (),
) -> Plan:
    """Which tensors are quantized, which share an amax, and which output shard holds each.

    ``source``: anything with ``config``, ``names()``, ``shape_dtype()``, ``nbytes()`` and ``where()``
    (a SourceCheckpoint, or the exporter's in-memory model tensors). ``exclude``: module-name globs kept
    in high precision (``--exclude``). A block-scaled FP8 source tensor (sibling ``weight_scale_inv``) is
    quantized from its codes and scales (read fused by the kernels) or, when kept, planned as its bf16 value;
    the scales themselves are dropped."""
    naming = naming_for(source.config, exclude)
    split = split_experts(source, naming.is_split)
    stacked = {piece.stacked for piece in split.values()}
    names = sorted([n for n in source.names() if n not in stacked] + list(split))
    fp8_scales = fp8_block_scales(names)
    dropped = set(fp8_scales.values())

    def shape_dtype(name: str) -> tuple[tuple[int, ...], str]:
        return (split[name].shape, split[name].dtype) if name in split else source.shape_dtype(name)

    def nbytes(name: str) -> int:
        return split[name].nbytes() if name in split else source.nbytes(name)

    decisions = {n: naming.decide(n, experts_only) for n in names if n not in dropped}
    if fmt is None:
        decisions = {n: Decision(PASS) for n in decisions}
    if naming.unused_excludes and fmt is not None:
        raise CheckpointError(
            f"--exclude {sorted(naming.unused_excludes)[0]}: matches no quantized module of this "
            f"{naming.family.name} checkpoint (patterns are globs over module names, e.g. '*.self_attn.*')"
        )
    quantized = [n for n, d in decisions.items() if d.action == QUANTIZE]
    if fmt is not None and not quantized:
        raise CheckpointError(
            f"nothing to quantize: every linear of this {naming.family.name} checkpoint is kept (by --exclude, or "
            "--experts-only on a model without routed experts); the output would be the source labelled "
            f"{fmt.name}"
        )
    check_experts(source, {n: shape_dtype(n)[0] for n, d in decisions.items() if d.routed and not d.transposed})
    routed = {n for n in quantized if decisions[n].routed}
    keys = naming.scale_groups(quantized, fmt is not None and fmt.shares_input_scale, routed)
    unit_of_key: dict[str, Unit] = {}
    units: list[Unit] = []
    exclude_modules = {d.exclude for d in decisions.values() if d.exclude}
    for name, decision in decisions.items():
        shape, dtype = shape_dtype(name)
        inv = fp8_scales.get(name)
        in_bytes = nbytes(name) + (source.nbytes(inv) if inv else 0)
        held = int(torch.Size(shape).numel()) * 2 if inv else 0  # dequantized to bf16
        scale_inv = {name: inv} if inv else {}
        slices = {name: split[name]} if name in split else {}
        if decision.action != QUANTIZE:
            units.append(
                Unit(
                    names=[name], quantize=False, in_bytes=in_bytes, out_bytes=held or nbytes(name),
                    scale_inv=scale_inv, load_bytes=held, slices=slices,
                )
            )  # fmt: skip
            continue
        transposed = decision.transposed
        dims, inner = (3, shape[-2]) if transposed else (2, shape[-1])
        if (dtype not in QUANTIZABLE_DTYPES and not inv) or len(shape) != dims or inner % fmt.input_multiple:
            raise CheckpointError(
                f"{source.where(name)}: tensor {name} ({dtype}, shape {list(shape)}) cannot be "
                f"quantized to {fmt.name}: expected a {'stacked 3-D' if transposed else '2-D'} bf16/fp16/fp32 "
                "(or block-scaled FP8) weight"
                + (
                    f" with an input dim ({'-2' if transposed else '-1'}) that is a multiple of {fmt.input_multiple}"
                    if fmt.input_multiple > 1
                    else ""
                )
            )
        if transposed and fmt.per_channel:
            raise CheckpointError(
                f"{source.where(name)}: stacked expert tensor {name}: --format {fmt.name} is not supported for "
                "stacked experts (use nvfp4 or fp8)"
            )
        key = keys[name]
        if key not in unit_of_key:
            unit_of_key[key] = Unit(names=[], quantize=True, in_bytes=0, out_bytes=0, transposed=transposed)
            units.append(unit_of_key[key])
        unit = unit_of_key[key]
        unit.names.append(name)
        unit.in_bytes += in_bytes
        unit.load_bytes += in_bytes  # an FP8-block source stays FP8 until the kernels read it
        unit.out_bytes += _out_bytes(shape, fmt, transposed)
        unit.scale_inv.update(scale_inv)
        unit.slices.update(slices)
    shards = pack(units, max_shard_bytes, lambda u: u.out_bytes)
    plan = Plan(fmt=fmt, shards=shards, exclude_modules=sorted(exclude_modules), split=split)
    if fmt is not None and fmt.is_fp8_block:
        from moeq_triton.checkpoint.checks import block_shape_warning

        warning = block_shape_warning({n: shape_dtype(n)[0][0] for n in quantized})
        plan.warnings += [warning] if warning else []
    unindexed = getattr(source, "unindexed", [])
    if unindexed:
        plan.warnings.append(
            f"{len(unindexed)} tensor(s) in the source's shards are not in its index and are not carried "
            f"(loaders skip them too), e.g. {unindexed[0]}"
        )
    return plan


_EXPERT = re.compile(r"(.*)\.(\d+)\.(\w+)\.weight")


def check_experts(source, shapes: dict[str, tuple[int, ...]]) -> None:
    """Routed experts an engine would load wrongly, refused: an expert missing gate, up or down, gate and up
    of different shapes (the engines fuse them), or a layer whose expert count is not config.json's.

    ``shapes``: routed per-expert weight name -> shape (stacked tensors on disk already split per expert)."""
    experts: dict[str, dict[int, dict[str, str]]] = {}
    for name in shapes:
        match = _EXPERT.fullmatch(name)
        if match:
            base, e, leaf = match.groups()
            experts.setdefault(base, {}).setdefault(int(e), {})[leaf] = name
    config = source.config.get("text_config") if isinstance(source.config.get("text_config"), dict) else {}
    config = {**config, **source.config}
    declared = next(((k, config[k]) for k in serving.EXPERT_COUNT_KEYS if isinstance(config.get(k), int)), None)
    config_file = f"{source.path / 'config.json'}" if hasattr(source, "path") else "config"
    for base, by_index in sorted(experts.items()):
        for e, leaves in sorted(by_index.items()):
            wanted = ("w1", "w3", "w2") if set(leaves) & {"w1", "w2", "w3"} else ("gate_proj", "up_proj", "down_proj")
            missing = [leaf for leaf in wanted if leaf not in leaves]
            some = next(iter(leaves.values()))
            if missing:
                raise CheckpointError(
                    f"{source.where(some)}: expert {base}.{e} has {', '.join(sorted(leaves))} but no {missing[0]}; "
                    "an engine would load it with uninitialized weights"
                )
            gate, up = leaves[wanted[0]], leaves[wanted[1]]
            if shapes[gate] != shapes[up]:
                raise CheckpointError(
                    f"{source.where(up)}: {up} has shape {list(shapes[up])} but {gate} has {list(shapes[gate])}; "
                    "the engines fuse gate and up into one tensor"
                )
        if declared and declared[1] > 1 and (len(by_index) != declared[1] or max(by_index) + 1 != declared[1]):
            raise CheckpointError(
                f"{config_file}: {declared[0]} = {declared[1]}, but {base} holds {len(by_index)} experts "
                f"(indices {min(by_index)}..{max(by_index)}); the engines allocate {declared[0]} experts per layer"
            )


def verify(
    destination: str | os.PathLike,
    source: SourceCheckpoint,
    plan: Plan,
    device: torch.device,
    *,
    allowed_nonfinite: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """Reload the output: every expected tensor with its dtype and shape, a bitwise re-quantization of one
    scale group per shard, then ``inspect``'s checks (missing or unshared scales, NaN/Inf in any tensor but
    the kept ones the user allowed with ``allowed_nonfinite``).  Returns (problems, warnings): the problems
    found (empty when the checkpoint is sound) and inspect's warnings (the same lines ``inspect`` prints)."""
    problems = []
    try:
        result = SourceCheckpoint(destination)
    except CheckpointError as error:
        return [str(error)], []
    expected = shard_layout(plan, source, plan.units)
    missing = sorted(set(expected) - set(result.weight_map))
    extra = sorted(set(result.weight_map) - set(expected))
    if missing or extra:
        problems.append(f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, (shape, dtype) in expected.items():
        if name in result.weight_map and result.shape_dtype(name) != (shape, dtype):
            problems.append(f"{name}: {result.shape_dtype(name)}, expected shape {shape} and dtype {dtype}")
    for shard in plan.shards:
        unit = next((u for u in shard if u.quantize), None)
        if unit is None or problems:
            continue
        loaded = read_units([unit], source, device)
        again = quantize_units([unit], loaded, plan.fmt, source)
        for key, tensor in again.items():
            if not same_bytes(result.tensor(key), tensor.cpu()):
                problems.append(f"{key}: stored bytes differ from a fresh quantization of the source")
    warnings: list[str] = []
    if not problems:  # the bytes as written: scales present and shared, no NaN/Inf anywhere (a full pass)
        from moeq_triton.checkpoint.checks import ERROR, inspect_checkpoint

        report = inspect_checkpoint(destination, device.type)
        allowed = set(allowed_nonfinite)
        for finding in report.findings:
            if finding.severity != ERROR:
                warnings.append(finding.message)
            elif finding.about == "checkpoint" and not (finding.nonfinite and finding.tensor in allowed):
                problems.append(finding.message)
    return problems, warnings


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Dtype, shape and every bit equal (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def quantize_checkpoint(
    source_path: str | os.PathLike,
    destination: str | os.PathLike,
    fmt: Format,
    *,
    experts_only: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_bytes: int = 2 << 30,
    batch_bytes: int = BATCH_BYTES,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    exclude: tuple[str, ...] = (),
    allow_nonfinite_kept: bool = False,
    on_commit: Callable[[], None] = lambda: None,
) -> tuple[Plan, Stats, float]:
    """The whole job in one process (rank/world from torchrun's environment when present): ``job.run_job``
    with every rank reading and writing whole shards of its own (``CheckpointFeed``).

    Any failure on any rank (an error, an interrupt) leaves the destination as it was on every rank;
    ``on_commit`` runs as soon as the complete output is in place."""
    start = time.perf_counter()
    distributed.init_from_environment(device)
    run_id = distributed.gather_objects(new_run_id())[0]  # rank 0's: names the partial directory on every rank

    def prepare() -> tuple[Plan, SourceCheckpoint, AtomicCheckpointDir]:
        source = SourceCheckpoint(source_path)  # every rank reads the source and checks the destination
        refuse_quantized_source(source)
        plan = make_plan(source, fmt, experts_only=experts_only, max_shard_bytes=max_shard_bytes, exclude=exclude)
        return plan, source, AtomicCheckpointDir(destination, overwrite, protect=[source_path], run_id=run_id)

    def feed(plan: Plan, source: SourceCheckpoint) -> CheckpointFeed:
        return CheckpointFeed(plan, source, torch.device(device), progress=progress)

    plan, stats = job.run_job(
        prepare,
        feed,
        preparing="reading the source and preparing the destination",
        batch_bytes=batch_bytes,
        allow_nonfinite_kept=allow_nonfinite_kept,
        on_commit=on_commit,
    )
    return plan, stats, time.perf_counter() - start


class CheckpointFeed(Feed):
    """The command's part of the job: shard s belongs to rank s % world, which reads its tensors from the
    source checkpoint (a thread reads the next batch meanwhile) and writes the shard itself."""

    def __init__(
        self,
        plan: Plan,
        source: SourceCheckpoint,
        device: torch.device,
        *,
        progress: Callable[[int, int], Callable[[int], None]] | None = None,
    ) -> None:
        super().__init__(source)
        self.device = device
        if progress is not None:  # this rank's bar over the source bytes of its own shards
            total = sum(u.in_bytes for s in self.shards(plan) for u in plan.shards[s])
            self.advance = progress(distributed.rank_world()[0], total)

    def batches(self, batches: list[list[Unit]]):
        return job.prefetched(batches, lambda batch: read_units(batch, self.source, self.device))


def refuse_quantized_source(source: SourceCheckpoint) -> None:
    """A checkpoint that is already quantized (other than the FP8-block sources dequantized on reading) is
    refused by name: re-quantizing its codes would be meaningless."""
    config_file = source.path / "config.json"
    quant = source.config.get("quantization_config")
    if quant is not None and not isinstance(quant, dict):
        raise CheckpointError(f"{config_file}: quantization_config is a {type(quant).__name__}, expected an object")
    if quant and not (quant.get("quant_method") == "fp8" and quant.get("weight_block_size")):
        raise CheckpointError(
            f"{config_file}: the source is already quantized (quantization_config quant_method "
            f"{quant.get('quant_method')!r}); quantize from the unquantized (bf16) checkpoint"
        )
    if (source.path / "hf_quant_config.json").is_file():
        raise CheckpointError(
            f"{source.path / 'hf_quant_config.json'}: the source is already quantized (ModelOpt's hf_quant_config); "
            "quantize from the unquantized (bf16) checkpoint"
        )
    scale = next((n for n in source.names() if n.endswith((".weight_scale", ".weight_scale_2"))), None)
    if scale is not None:
        raise CheckpointError(
            f"{source.where(scale)}: tensor {scale}: the source is already quantized; quantize from the unquantized "
            "(bf16) checkpoint"
        )

"""Model-free quantization of a Hugging Face checkpoint, straight from its safetensors files.

Weight-only quantization needs no activations, so no model is built: the job is planned from tensor
names and shapes alone, then each output shard is produced by reading its source tensors once,
quantizing them in grouped kernel calls (scale groups such as an expert's gate/up are always read
together, so their shared amax needs no second pass) and writing the shard.  The plan is
deterministic, so N processes (torchrun) each produce whole shards and the result is the same files
a single process writes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .checkpoint_format import Format
from .checkpoint_io import SAFETENSORS_DTYPES, AtomicCheckpointDir, CheckpointError, SourceCheckpoint, shard_name
from .kernels import (
    NonFiniteWeightError,
    dequantize_nvfp4_reference,
    fp8_layout,
    grouped_amax,
    nvfp4_layout,
    quantize_fp8,
    quantize_nvfp4,
)
from .naming import module_of, naming_for

QUANTIZABLE_DTYPES = ("BF16", "F16", "F32")


@dataclass
class Unit:
    """Tensors read and processed together: one scale group, or one kept tensor."""

    names: list[str]
    quantize: bool
    in_bytes: int
    out_bytes: int


@dataclass
class Plan:
    fmt: Format | None  # None: an unquantized export (every tensor kept as it is)
    shards: list[list[Unit]]
    exclude_modules: list[str]

    @property
    def units(self) -> list[Unit]:
        return [u for shard in self.shards for u in shard]


def output_layout(shape: tuple[int, ...], fmt: Format):
    """(shape, dtype) of each tensor a quantized weight becomes, in output_names order."""
    return nvfp4_layout(shape) if fmt.is_nvfp4 else fp8_layout(shape, fmt.per_channel)


def _out_bytes(shape: tuple[int, ...], fmt: Format) -> int:
    return sum(int(torch.Size(s).numel()) * d.itemsize for s, d in output_layout(shape, fmt))


def make_plan(source: SourceCheckpoint, fmt: Format | None, experts_only: bool, max_shard_bytes: int) -> Plan:
    """Which tensors are quantized, which share an amax, and which output shard holds each.

    ``source``: anything with ``config``, ``names()``, ``shape_dtype()``, ``nbytes()`` and ``where()``
    (a SourceCheckpoint, or the exporter's in-memory model tensors)."""
    naming = naming_for(source.config)
    groups: dict[str, Unit] = {}
    units: list[Unit] = []
    exclude: list[str] = []
    for name in source.names():
        shape, dtype = source.shape_dtype(name)
        in_bytes = source.nbytes(name)
        linear = fmt is not None and bool(naming.quantized.match(name))
        if linear and experts_only and not naming.experts.match(name):
            exclude.append(module_of(name))
            linear = False
        if fmt is not None and naming.excluded.match(name):
            exclude.append(module_of(name))
        if not linear:
            units.append(Unit([name], False, in_bytes, in_bytes))
            continue
        if dtype not in QUANTIZABLE_DTYPES or len(shape) != 2 or (fmt.is_nvfp4 and shape[-1] % 16):
            raise CheckpointError(
                f"{source.where(name)}: tensor {name} ({dtype}, shape {list(shape)}) cannot be "
                f"quantized to {fmt.name}: expected a 2-D bf16/fp16/fp32 weight"
                + (" with a last dim that is a multiple of 16" if fmt.is_nvfp4 else "")
            )
        key = naming.scale_group(name, fmt.is_nvfp4)
        if key not in groups:
            groups[key] = Unit([], True, 0, 0)
            units.append(groups[key])
        unit = groups[key]
        unit.names.append(name)
        unit.in_bytes += in_bytes
        unit.out_bytes += _out_bytes(shape, fmt)
    shards = _pack(units, max_shard_bytes, lambda u: u.out_bytes)
    return Plan(fmt, shards, sorted(set(exclude)))


@dataclass
class Stats:
    quantized: int = 0
    kept: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: list[tuple[float, float]] = field(default_factory=list)  # (max, mean) relative error per sample
    nonfinite_kept: list[str] = field(default_factory=list)  # kept tensors carried through with NaN/Inf


def nonfinite_kept(
    names: list[str], loaded: dict[str, torch.Tensor], source: SourceCheckpoint, allow: bool
) -> list[str]:
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


def _quantize_units(
    units: list[Unit], loaded: dict[str, torch.Tensor], fmt: Format, source: SourceCheckpoint
) -> dict[str, torch.Tensor]:
    """Grouped kernel calls over every quantized tensor of a batch; shared amax per scale group."""
    names = [n for u in units for n in u.names]
    if not names:
        return {}
    weights = [loaded[n] for n in names]
    try:
        amax = grouped_amax(weights)
    except NonFiniteWeightError as error:
        name = names[error.index]
        raise CheckpointError(f"{source.where(name)}: tensor {name} contains NaN or Inf") from None
    owner = torch.tensor([i for i, u in enumerate(units) for _ in u.names], device=amax.device)
    group_max = torch.zeros(len(units), device=amax.device).scatter_reduce(0, owner, amax, "amax")[owner]
    out: dict[str, torch.Tensor] = {}
    if fmt.is_nvfp4:
        for name, q in zip(names, quantize_nvfp4(weights, group_max)):
            out[name], out[name + "_scale"], out[name + "_scale_2"] = q
    else:
        results = quantize_fp8(weights, None if fmt.per_channel else group_max, per_channel=fmt.per_channel)
        for name, q in zip(names, results):
            out[name], out[name + "_scale"] = q
    return out


def output_names(name: str, fmt: Format) -> list[str]:
    """The tensors a quantized weight becomes in the checkpoint."""
    return [name, name + "_scale"] + ([name + "_scale_2"] if fmt.is_nvfp4 else [])


def dequantize(tensors: dict[str, torch.Tensor], name: str, fmt: Format) -> torch.Tensor:
    """float32 values of a quantized weight from its output tensors."""
    from .kernels import NVFP4Weight

    if fmt.is_nvfp4:
        q = NVFP4Weight(tensors[name], tensors[name + "_scale"], tensors[name + "_scale_2"])
        return dequantize_nvfp4_reference(q)
    scale = tensors[name + "_scale"]
    return tensors[name].float() * (scale.unsqueeze(-1) if fmt.per_channel else scale)


def _relative_error(original: torch.Tensor, values: torch.Tensor) -> tuple[float, float]:
    err = (values.float() - original.float()).abs() / original.float().abs().amax().clamp_min(1e-30)
    return float(err.max()), float(err.mean())


def run_shards(
    plan: Plan,
    source: SourceCheckpoint,
    out: AtomicCheckpointDir,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    batch_bytes: int = 256 << 20,
    advance: Callable[[int], None] = lambda n: None,
    allow_nonfinite_kept: bool = False,
) -> Stats:
    """Produce this rank's shards (shard s belongs to rank s % world).

    Kept floating-point tensors are checked for NaN/Inf in one grouped amax call per batch (quantized
    ones are checked by their own amax, no extra pass); with ``allow_nonfinite_kept`` they are carried
    through and listed in ``Stats.nonfinite_kept``."""
    stats = Stats()
    for s, shard in enumerate(plan.shards):
        if s % world != rank:
            continue
        tensors: dict[str, torch.Tensor] = {}
        for batch, loaded in _prefetched(_pack(shard, batch_bytes, lambda u: u.in_bytes), source, device):
            quantized = [u for u in batch if u.quantize]
            result = _quantize_units(quantized, loaded, plan.fmt, source)
            if quantized:
                sample = quantized[0].names[0]
                stats.errors.append(_relative_error(loaded[sample], dequantize(result, sample, plan.fmt)))
            kept = [u.names[0] for u in batch if not u.quantize]
            stats.nonfinite_kept += nonfinite_kept(kept, loaded, source, allow_nonfinite_kept)
            for unit in batch:
                if not unit.quantize:
                    result[unit.names[0]] = loaded[unit.names[0]]
                stats.quantized += len(unit.names) if unit.quantize else 0
                stats.kept += 0 if unit.quantize else 1
                stats.bytes_in += unit.in_bytes
                stats.bytes_out += unit.out_bytes
                advance(unit.in_bytes)
            tensors.update({k: v.cpu() for k, v in result.items()})
        out.write_shard(shard_name(s, len(plan.shards)), tensors)
    return stats


def _prefetched(batches: list[list[Unit]], source: SourceCheckpoint, device: torch.device):
    """Yield (batch, its tensors) while a reader thread already loads the next batch (overlaps I/O and
    compute; at most two batches in memory)."""
    from concurrent.futures import ThreadPoolExecutor

    def load(batch: list[Unit]) -> dict[str, torch.Tensor]:
        return {n: source.tensor(n).to(device) for u in batch for n in u.names}

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(load, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            loaded = pending.result()
            pending = reader.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
            yield batch, loaded


def _pack(units: list[Unit], budget: int, size_of: Callable[[Unit], int]) -> list[list[Unit]]:
    """Consecutive units in groups of at most ``budget`` bytes (a larger unit stands alone)."""
    packs: list[list[Unit]] = [[]]
    size = 0
    for unit in units:
        if packs[-1] and size + size_of(unit) > budget:
            packs.append([])
            size = 0
        packs[-1].append(unit)
        size += size_of(unit)
    return packs


def write_metadata(plan: Plan, source: SourceCheckpoint, out: AtomicCheckpointDir) -> None:
    """config.json with quantization_config, hf_quant_config.json, tokenizer/generation files, and
    last the index (its metadata records every file written: the ownership record)."""
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
        out.write_json("hf_quant_config.json", plan.fmt.hf_quant_config(plan.exclude_modules))
    out.write_json("config.json", config)
    for extra in source.extra_files():
        out.copy_file(extra)
    out.write_index({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def verify(destination: str | os.PathLike, source: SourceCheckpoint, plan: Plan, device: torch.device) -> list[str]:
    """Reload the output: every expected tensor with its dtype and shape, and a bitwise re-quantization
    of one scale group per shard.  Returns the problems found (empty when the checkpoint is sound)."""
    problems = []
    try:
        result = SourceCheckpoint(destination)
    except CheckpointError as error:
        return [str(error)]
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    for unit in plan.units:
        for name in unit.names:
            if not unit.quantize:
                expected[name] = source.shape_dtype(name)
                continue
            layouts = output_layout(source.shape_dtype(name)[0], plan.fmt)
            for output, (shape, dtype) in zip(output_names(name, plan.fmt), layouts):
                expected[output] = (tuple(shape), names[dtype])
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
        loaded = {n: source.tensor(n).to(device) for n in unit.names}
        again = _quantize_units([unit], loaded, plan.fmt, source)
        for key, tensor in again.items():
            if not same_bytes(result.tensor(key), tensor.cpu()):
                problems.append(f"{key}: stored bytes differ from a fresh quantization of the source")
    return problems


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Dtype, shape and every bit equal (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def quantize_checkpoint(
    source_path: str | os.PathLike,
    destination: str | os.PathLike,
    fmt: Format,
    experts_only: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_bytes: int = 2 << 30,
    batch_bytes: int = 256 << 20,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    allow_nonfinite_kept: bool = False,
    on_commit: Callable[[], None] = lambda: None,
) -> tuple[Plan, Stats, float]:
    """The whole job in one process (rank/world from torchrun's environment when present).

    Any failure on any rank (an error, an interrupt) leaves the destination as it was on every rank;
    ``on_commit`` runs as soon as the complete output is in place."""
    from . import collectives

    start = time.perf_counter()
    rank, world = collectives.init_from_environment(device)
    made: dict = {}

    def prepare() -> None:  # every rank reads the source and checks the destination; rank 0 creates it
        made["source"] = SourceCheckpoint(source_path)
        made["plan"] = make_plan(made["source"], fmt, experts_only, max_shard_bytes)
        made["out"] = AtomicCheckpointDir(destination, overwrite, protect=[source_path])
        if rank == 0:
            made["out"].create()

    failure = collectives.agree(prepare, "reading the source and preparing the destination")
    if failure is not None:
        if rank == 0 and "out" in made:
            made["out"].abort()
        raise failure
    source, plan, out = made["source"], made["plan"], made["out"]
    advance = (
        progress(rank, sum(u.in_bytes for s, sh in enumerate(plan.shards) if s % world == rank for u in sh))
        if progress
        else (lambda n: None)
    )
    stats = Stats()

    def shards() -> None:
        nonlocal stats
        stats = run_shards(
            plan, source, out, torch.device(device), rank, world, batch_bytes, advance, allow_nonfinite_kept
        )

    def finish() -> None:
        if rank == 0:
            write_metadata(plan, source, out)
            out.commit(on_commit)

    for step, what in ((shards, "quantizing and writing shards"), (finish, "writing metadata")):
        failure = collectives.agree(step, what)
        if failure is not None:
            if rank == 0:
                out.abort()
            raise failure
    collectives.barrier()
    return plan, stats, time.perf_counter() - start

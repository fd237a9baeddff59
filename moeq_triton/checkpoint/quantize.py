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
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moeq_triton.checkpoint import serving
from moeq_triton.checkpoint.formats import Format, dequantize, output_layout, output_names
from moeq_triton.checkpoint.io import (
    SAFETENSORS_DTYPES,
    AtomicCheckpointDir,
    CheckpointError,
    SourceCheckpoint,
    new_run_id,
    shard_name,
)
from moeq_triton.checkpoint.source import ExpertSlice, dense, fp8_block_scales, read_units, split_experts
from moeq_triton.kernels import (
    NonFiniteWeightError,
    NVFP4Weight,
    grouped_amax,
    quantize_fp8,
    quantize_fp8_block,
    quantize_nvfp4,
)
from moeq_triton.naming import PASS, QUANTIZE, Decision, naming_for

QUANTIZABLE_DTYPES = ("BF16", "F16", "F32")


@dataclass
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


@dataclass
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
            units.append(Unit([name], False, in_bytes, held or nbytes(name), scale_inv, held, slices=slices))
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
            unit_of_key[key] = Unit([], True, 0, 0, transposed=transposed)
            units.append(unit_of_key[key])
        unit = unit_of_key[key]
        unit.names.append(name)
        unit.in_bytes += in_bytes
        unit.load_bytes += in_bytes  # an FP8-block source stays FP8 until the kernels read it
        unit.out_bytes += _out_bytes(shape, fmt, transposed)
        unit.scale_inv.update(scale_inv)
        unit.slices.update(slices)
    shards = pack(units, max_shard_bytes, lambda u: u.out_bytes)
    plan = Plan(fmt, shards, sorted(exclude_modules), split)
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


def kept_layout(plan: Plan, source: SourceCheckpoint, unit: Unit, name: str) -> tuple[tuple[int, ...], str]:
    """Shape and safetensors dtype of a kept tensor in the output (an FP8-block source tensor becomes BF16)."""
    shape, dtype = plan.source_layout(source, name)
    return (shape, "BF16") if name in unit.scale_inv else (shape, dtype)


@dataclass
class Stats:
    quantized: int = 0
    kept: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: list[tuple[float, float]] = field(default_factory=list)  # (max, mean) relative error per sample
    nonfinite_kept: list[str] = field(default_factory=list)  # kept tensors carried through with NaN/Inf
    all_zero: int = 0  # quantized tensors whose every value is zero (written as the exact-zero encoding)
    warnings: list[str] = field(default_factory=list)  # odd but loadable: said once at the end


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


def quantize_units(
    units: list[Unit],
    loaded: dict[str, torch.Tensor],
    fmt: Format,
    source: SourceCheckpoint,
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


def run_shards(
    plan: Plan,
    source: SourceCheckpoint,
    out: AtomicCheckpointDir,
    device: torch.device,
    *,
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
        layout = shard_layout(plan, source, shard)
        with out.open_shard(shard_name(s, len(plan.shards)), layout) as file:  # written batch by batch, overlapped
            for batch, loaded in _prefetched(batch_plan(shard, batch_bytes), source, device):
                file.write(
                    quantize_batch(
                        plan, batch, loaded, source, stats=stats, advance=advance,
                        allow_nonfinite_kept=allow_nonfinite_kept,
                    )
                )  # fmt: skip
    return stats


def quantize_batch(
    plan: Plan,
    batch: list[Unit],
    loaded: dict[str, torch.Tensor],
    source: SourceCheckpoint,
    *,
    stats: Stats,
    advance: Callable[[int], None],
    allow_nonfinite_kept: bool,
) -> dict[str, torch.Tensor]:
    """One batch's output tensors (quantized and kept, on the CPU), its counts added to ``stats``."""
    quantized = [u for u in batch if u.quantize]
    zero: list[str] = []
    result = quantize_units(quantized, loaded, plan.fmt, source, all_zero=zero)
    stats.all_zero += len(zero)
    sampled = next((u for u in quantized if not u.transposed), None)
    if sampled:
        sample = sampled.names[0]
        stats.errors.append(relative_error(dense(loaded[sample]), dequantize(result, sample, plan.fmt)))
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
    return {k: v.cpu() for k, v in result.items()}


def shard_layout(plan: Plan, source: SourceCheckpoint, shard: list[Unit]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every output tensor of a shard: name -> (shape, safetensors dtype name), known before any is computed."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    layout: dict[str, tuple[tuple[int, ...], str]] = {}
    for unit in shard:
        for name in unit.names:
            if not unit.quantize:
                layout[name] = kept_layout(plan, source, unit, name)
                continue
            layouts = output_layout(plan.source_layout(source, name)[0], plan.fmt, unit.transposed)
            for output, (shape, dtype) in zip(output_names(name, plan.fmt), layouts):
                layout[output] = (tuple(shape), names[dtype])
    return layout


def batch_plan(shard: list[Unit], batch_bytes: int) -> list[list[Unit]]:
    """The batches one shard is read in: at most ``batch_bytes`` held in memory each (dequantized size)."""
    return pack(shard, batch_bytes, lambda u: u.held_bytes)


def _prefetched(batches: list[list[Unit]], source: SourceCheckpoint, device: torch.device):
    """Yield (batch, its tensors) while a reader thread already loads the next batch (overlaps I/O and
    compute; at most two batches of input in memory, besides the previous batch's output being written)."""
    from concurrent.futures import ThreadPoolExecutor

    def load(batch: list[Unit]) -> dict[str, torch.Tensor]:
        return read_units(batch, source, device)

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(load, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            loaded = pending.result()
            pending = reader.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
            yield batch, loaded


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
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    for unit in plan.units:
        for name in unit.names:
            if not unit.quantize:
                expected[name] = kept_layout(plan, source, unit, name)
                continue
            layouts = output_layout(plan.source_layout(source, name)[0], plan.fmt, unit.transposed)
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
    batch_bytes: int = 256 << 20,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    exclude: tuple[str, ...] = (),
    allow_nonfinite_kept: bool = False,
    on_commit: Callable[[], None] = lambda: None,
) -> tuple[Plan, Stats, float]:
    """The whole job in one process (rank/world from torchrun's environment when present).

    Any failure on any rank (an error, an interrupt) leaves the destination as it was on every rank;
    ``on_commit`` runs as soon as the complete output is in place."""
    from moeq_triton import distributed

    start = time.perf_counter()
    rank, world = distributed.init_from_environment(device)
    made: dict = {}
    run_id = distributed.gather_objects(new_run_id())[0]  # rank 0's: names the partial directory on every rank

    def prepare() -> None:  # every rank reads the source and checks the destination; rank 0 creates it
        made["source"] = SourceCheckpoint(source_path)
        refuse_quantized_source(made["source"])
        made["plan"] = make_plan(
            made["source"], fmt, experts_only=experts_only, max_shard_bytes=max_shard_bytes, exclude=exclude
        )
        made["out"] = AtomicCheckpointDir(destination, overwrite, protect=[source_path], run_id=run_id)
        if rank == 0:
            made["out"].create()

    failure = distributed.agree(prepare, "reading the source and preparing the destination")
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
            plan,
            source,
            out,
            torch.device(device),
            rank=rank,
            world=world,
            batch_bytes=batch_bytes,
            advance=advance,
            allow_nonfinite_kept=allow_nonfinite_kept,
        )

    def finish() -> None:
        if rank == 0:
            write_metadata(plan, source, out)
            out.commit(on_commit)

    for step, what in ((shards, "quantizing and writing shards"), (finish, "writing metadata")):
        failure = distributed.agree(step, what)
        if failure is not None:
            if rank == 0:
                out.abort()
            raise failure
    distributed.barrier()
    stats.warnings += plan.warnings
    return plan, stats, time.perf_counter() - start


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

"""Export a model (calibrated through ModelOpt, or plain) as a Hugging Face checkpoint in ModelOpt's format.

    moeq_triton.export_hf(model, "out/")                       # a transformers MoE model
    moeq_triton.export_hf(gpt_model, "out/", hf_config=config)  # a Megatron-Core GPTModel, any TP x PP x EP

The model's tensors are first named as the Hugging Face checkpoint names them (transformers' own
reverse conversion; for Megatron the mapping below), then the model-free machinery takes over: the
same plan, the same grouped kernel calls per shard on the model's device, the same files and configs
(``moeq_triton.checkpoint``, ``moeq_triton.naming``).  The format comes from the
model's weight quantizers (NVFP4, FP8 per tensor or per channel); a model without them is exported
unquantized.  Amaxes are recomputed as the weights' own max per scale group, which is exactly what
ModelOpt's ``max`` calibration (and ``triton_grouped``) gives; a model whose weight quantizers were
calibrated otherwise (another calibrator, pre-quantization scales from AWQ/SmoothQuant) is refused.

Under torch.distributed each rank lists the parts it holds (Megatron: its tensor-parallel slices, its experts,
its pipeline stage's layers under global numbers); each tensor has one owner (split tensors' owners rotate
over the ranks holding them), which receives the other parts per batch and joins them as Megatron cut them
(``naming.megatron``), so amaxes come from the whole weight.  Owners quantize, send the results to rank 0
as raw bytes (no pickling of tensors; only names and shapes travel as objects), and rank 0 writes: the
files equal a single-process export.  The destination is complete or absent.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from moeq_triton import distributed
from moeq_triton.checkpoint import job
from moeq_triton.checkpoint.formats import FORMATS, dequantize, output_layout, output_names
from moeq_triton.checkpoint.io import SAFETENSORS_DTYPES, AtomicCheckpointDir, CheckpointError, SourceCheckpoint
from moeq_triton.checkpoint.job import BATCH_BYTES, Feed, Plan, Unit
from moeq_triton.checkpoint.quantize import make_plan
from moeq_triton.modelopt.export_format import detect_format
from moeq_triton.naming import FAMILIES, family_for, megatron

# ---------------------------------------------------------------- the model's tensors under HF names


def transformers_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """On-disk names and layout (per-expert tensors) via transformers' own reverse weight conversion."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {k: v for k, v in model.state_dict().items() if "quantizer" not in k and not k.endswith("_extra_state")}
    return revert_weight_conversion(model, state)


@dataclass(kw_only=True)
class Piece:
    """One rank's slice of an HF tensor: part ``index`` of ``parts`` equal parts along ``dim``; the joined
    tensor keeps its first ``rows`` rows (vocab padding dropped; None: all)."""

    tensor: torch.Tensor
    index: int = 0
    parts: int = 1
    dim: int = 0
    rows: int | None = None

    def layout(self) -> tuple:
        return (self.index, self.parts, self.dim, self.rows, tuple(self.tensor.shape), _dtype_name(self.tensor))


def _dtype_name(tensor: torch.Tensor) -> str:
    return {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}.get(tensor.dtype, str(tensor.dtype))


def megatron_tensors(model: torch.nn.Module, hf_config: dict) -> dict[str, Piece]:
    """This rank's slices of a Megatron-Core GPTModel under Hugging Face names (``naming.megatron``).

    Global layer numbers (pipeline stages), global expert indices (expert parallelism), and for each
    tensor-parallel parameter which part of the HF tensor this rank holds (tensor / expert-tensor ranks).
    """
    family = family_for(hf_config).name
    par = _parallelism(model)
    heads, groups = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    layer_of = {i: layer.layer_number - 1 for i, layer in enumerate(getattr(model.decoder, "layers", ()))}
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("router.expert_bias"))
    out: dict[str, Piece] = {}
    for name, param in tensors.items():
        name = name.removeprefix("module.")
        if param is None or (tied and name == "output_layer.weight"):
            continue  # a tied output layer is the embedding (HF writes no lm_head)
        tensor = param.detach()
        if name.endswith("router.expert_bias"):
            tensor = tensor.float()  # what Megatron keeps it in, and transformers holds e_score_correction_bias in
        expert = ".mlp.experts." in name
        rank, size = (par["etp_rank"], par["etp"]) if expert else (par["tp_rank"], par["tp"])
        try:
            mapped = megatron.hf_names(
                name, family, layer_of=layer_of, first_expert=par["first_expert"], config=hf_config
            )
        except megatron.UnmappedParameter as error:
            raise CheckpointError(str(error)) from None
        _check_bias_present(name, tensors, family, hf_config)
        cut, names = mapped.cut, mapped.names
        if cut == megatron.COPY:
            out[names[0]] = Piece(tensor=tensor)
        elif cut in (megatron.COLUMN, megatron.ROW):
            dim = 0 if cut == megatron.COLUMN or tensor.dim() == 1 else 1
            out[names[0]] = Piece(tensor=tensor, index=rank, parts=size, dim=dim)
        elif cut == megatron.VOCAB:
            out[names[0]] = Piece(tensor=tensor, index=rank, parts=size, rows=hf_config["vocab_size"])
        elif cut == megatron.GLU:
            for hf, half in zip(names, tensor.chunk(2, dim=0)):
                out[hf] = Piece(tensor=half, index=rank, parts=size)
        elif cut == megatron.QKV:
            per_group = tensor.view(groups // size, (heads // groups + 2) * head_dim, *tensor.shape[1:])
            parts = per_group.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
            for hf, part in zip(names, parts):
                out[hf] = Piece(tensor=part.reshape(-1, *tensor.shape[1:]), index=rank, parts=size)
        else:  # GroupedMLP: weight1 [H, E_local * fc1_out], weight2 [E_local * fc2_in, H]
            local = model.config.num_moe_experts // par["ep"]
            stacked = tensor.view(tensor.shape[0], local, -1).permute(1, 2, 0) if cut == megatron.GROUPED_FC1 else (
                tensor.view(local, -1, tensor.shape[-1]).transpose(1, 2))  # fmt: skip
            for e in range(local):
                hf = [n.format(e=par["first_expert"] + e) for n in names]
                if cut == megatron.GROUPED_FC1:
                    for one, half in zip(hf, stacked[e].chunk(2, dim=0)):
                        out[one] = Piece(tensor=half, index=rank, parts=size)
                else:
                    out[hf[0]] = Piece(tensor=stacked[e], index=rank, parts=size, dim=1)
    return out


def _check_bias_present(name: str, tensors: dict, family: str, hf_config: dict) -> None:
    """A linear the HF config gives a bias must have one in Megatron: transformers would initialise it at random."""
    kind = megatron.bias_kind(name)
    if kind is None or not re.search(r"\.weight\d*$", name):
        return
    present, why = megatron.family_has_bias(family, kind, hf_config)
    bias = re.sub(r"\.weight(\d*)$", r".bias\1", name)
    if present and tensors.get(bias) is None and tensors.get(f"module.{bias}") is None:
        raise CheckpointError(f"Megatron parameter {bias} is missing: {why} (HF would initialise it at random)")


def _parallelism(model: torch.nn.Module) -> dict[str, int]:
    """Tensor / expert-tensor ranks and sizes, and this rank's first global expert (1 / 0 without Megatron)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return dict(tp=1, tp_rank=0, etp=1, etp_rank=0, ep=1, first_expert=0)
    ep = ps.get_expert_model_parallel_world_size()
    experts = getattr(model.config, "num_moe_experts", None) or 0
    return dict(
        tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        etp=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank(),
        ep=ep, first_expert=ps.get_expert_model_parallel_rank() * (experts // ep),
    )  # fmt: skip


def is_megatron(model: torch.nn.Module) -> bool:
    return (
        type(model).__module__.startswith("megatron.core") or hasattr(model, "decoder") and hasattr(model, "embedding")
    )


def hf_config_dict(config) -> dict:
    """config.json content from a transformers config or a dict; ``architectures`` filled in when absent."""
    if not isinstance(config, dict):
        config = json.loads(config.to_json_string(use_diff=True))
    config = dict(config)
    if not config.get("architectures"):
        family = next((f for f in FAMILIES if config.get("model_type") in f.model_types), None)
        if family is not None:
            config["architectures"] = [family.architectures[0]]
    return config


# ---------------------------------------------------------------- the source the plan reads


class ModelTensors:
    """The model's tensors as a plan source (names, shapes, dtypes, origin), across ranks.

    ``meta`` covers every rank's tensors at their full (joined) shape; ``owner`` joins a name's parts
    (``join``) and quantizes it: the lowest rank holding part 0, until ``spread`` rotates the owners of
    split units over the ranks holding their parts.  Ranks
    holding the same part (data-parallel replicas, a norm every tensor-parallel rank holds) are
    equivalent: the lowest one sends it.
    """

    def __init__(self, pieces: dict[str, Piece], config: dict, source_dir: str | os.PathLike | None) -> None:
        self.pieces = pieces
        self.config = config
        self.source_dir = Path(source_dir) if source_dir else None
        self.rank, self.world = distributed.rank_world()
        per_rank = distributed.gather_objects({n: p.layout() for n, p in pieces.items()})  # no tensors pickled
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self.owner: dict[str, int] = {}
        self.holders: dict[str, dict[int, tuple[int, tuple]]] = {}  # name -> part -> (lowest rank, layout)
        for rank, entries in enumerate(per_rank):
            for name, layout in entries.items():
                parts = self.holders.setdefault(name, {})
                first = parts.get(layout[0]) or next(iter(parts.values()), None)
                if first is not None and (first[1][1:4], first[1][5]) != (layout[1:4], layout[5]):
                    raise CheckpointError(
                        f"{name}: rank {rank} holds it as {_describe(layout)}, rank {first[0]} as {_describe(first[1])}"
                    )
                parts.setdefault(layout[0], (rank, layout))
        for name, parts in self.holders.items():
            index, count, dim, rows, shape, dtype = parts[min(parts)][1]
            missing = sorted(set(range(count)) - set(parts))
            if missing:
                raise CheckpointError(f"{name}: parts {missing} of {count} (dim {dim}) are held by no rank")
            full = list(shape)
            full[dim] = sum(parts[i][1][4][dim] for i in range(count))
            if rows is not None:
                full[0] = min(full[0], rows)
            self.meta[name] = (tuple(full), dtype)
            self.owner[name] = parts[0][0]
        self.joined: dict[str, torch.Tensor] = {}

    def spread(self, units) -> None:
        """The k-th unit whose tensors are all split gets the lowest holder of part k (modulo the part count)
        of its first tensor as owner of all its tensors: joining and quantizing spread over the TP ranks."""
        k = 0
        for unit in units:
            counts = {len(self.holders[n]) for n in unit.names}
            if min(counts) > 1:
                parts = self.holders[unit.names[0]]
                owner = parts[k % len(parts)][0]
                self.owner.update(dict.fromkeys(unit.names, owner))
                k += 1

    def names(self) -> list[str]:
        return sorted(self.meta)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        return self.meta[name]

    def nbytes(self, name: str) -> int:
        shape, dtype = self.meta[name]
        return int(torch.Size(shape).numel()) * SAFETENSORS_DTYPES[dtype].itemsize

    def where(self, name: str) -> str:
        return f"the model (rank {self.owner.get(name, self.rank)})"

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor: joined from its parts (``join`` first) or this rank's own."""
        if name in self.joined:
            return self.joined[name]
        return self.pieces[name].tensor.contiguous()

    def join(self, names: list[str]) -> None:
        """Bring every part of ``names`` to its owner, joined as Megatron cut it (point to point, raw bytes,
        in the order of ``names`` on every rank); the owner keeps them until ``release``."""
        for name in names:
            parts = self.holders[name]
            if len(parts) == 1 and self.meta[name][0] == parts[0][1][4]:
                continue  # whole on one rank (a replica elsewhere is not needed)
            owner = self.owner[name]
            received = []
            for index in range(len(parts)):
                holder, layout = parts[index]
                if self.rank == holder and holder != owner:
                    distributed.send_bytes(self.pieces[name].tensor, dst=owner)
                elif self.rank == owner:
                    if holder == owner:  # its own part
                        received.append(self.pieces[name].tensor)
                        continue
                    shape, dtype = layout[4], SAFETENSORS_DTYPES[layout[5]]
                    buffer = distributed.recv_bytes(int(torch.Size(shape).numel()) * dtype.itemsize, src=holder)
                    received.append(buffer.view(dtype).reshape(shape))
            if self.rank == owner:
                dim, rows = parts[0][1][2], parts[0][1][3]
                whole = torch.cat([p.to(received[0].device) for p in received], dim=dim)
                self.joined[name] = whole[:rows].contiguous() if rows is not None else whole

    def release(self) -> None:
        self.joined.clear()

    def extra_files(self):
        from moeq_triton.checkpoint.io import EXTRA_FILES

        for file in EXTRA_FILES if self.source_dir else ():
            if (self.source_dir / file).is_file():
                yield self.source_dir / file


def _describe(layout: tuple) -> str:
    index, parts, dim, rows, shape, dtype = layout
    return f"part {index} of {parts} along dim {dim}, {list(shape)} {dtype}"


# ---------------------------------------------------------------- export


def export_hf(
    model: torch.nn.Module,
    export_dir: str | os.PathLike,
    hf_config=None,
    *,
    fmt: str | None = "auto",
    experts_only: bool = False,
    exclude: tuple[str, ...] = (),
    source_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 << 30,
    batch_bytes: int = BATCH_BYTES,
    progress: Callable[[int], None] = lambda n: None,
) -> Path:
    """Write ``model`` as a checkpoint vLLM / TensorRT-LLM / SGLang load; every rank calls it.

    hf_config: required for a Megatron model (a transformers config or dict naming the architecture);
    fmt: "auto" (from the weight quantizers), a format name ("nvfp4", "fp8", "fp8-per-channel", "fp8-block") or None
    (unquantized); exclude: module-name globs kept in high precision (as ``--exclude``); source_dir: where
    tokenizer and generation files are copied from; batch_bytes: source bytes joined and quantized together
    (the command's ``--batch-size``; the files do not depend on it).
    """
    if is_megatron(model):
        if hf_config is None:
            raise ValueError("a Megatron model needs hf_config (e.g. the Qwen3MoeConfig it mirrors)")
        config = hf_config_dict(hf_config)
        tensors = megatron_tensors(model, config)
    else:
        config = hf_config_dict(hf_config if hf_config is not None else model.config)
        tensors = {name: Piece(tensor=tensor) for name, tensor in transformers_tensors(model).items()}
    chosen = detect_format(model) if fmt == "auto" else (FORMATS[fmt] if fmt else None)
    source = ModelTensors(tensors, config, source_dir)
    plan = make_plan(source, chosen, experts_only=experts_only, max_shard_bytes=max_shard_bytes, exclude=tuple(exclude))
    source.spread(plan.units)

    def prepare() -> tuple[Plan, ModelTensors, AtomicCheckpointDir]:  # every rank checks the destination
        return plan, source, AtomicCheckpointDir(export_dir, overwrite, protect=[source_dir] if source_dir else [])

    # kept tensors are carried as the model holds them (NaN/Inf included), as ModelOpt's export does
    job.run_job(
        prepare,
        lambda plan, source: ModelFeed(source, progress),
        preparing="checking the export directory",
        batch_bytes=batch_bytes,
        allow_nonfinite_kept=True,
    )
    return Path(export_dir)


class ModelFeed(Feed):
    """The exporter's part of the job: every rank takes part in every shard (the same batches on every rank).
    Per batch, owners receive the other parts of their tensors (``ModelTensors.join``) and quantize their
    units; per shard, the results go to rank 0 as raw bytes and rank 0 writes.  A rank holds its own
    slices, one joined batch and its part of one output shard.

    Every step runs through ``distributed.together``: a failure never leaves a rank waiting for bytes that
    will not come.
    """

    def __init__(self, source: ModelTensors, advance: Callable[[int], None] = lambda n: None) -> None:
        super().__init__(source, advance)

    def shards(self, plan: Plan) -> range:
        return range(len(plan.shards))

    def batches(self, batches: list[list[Unit]]):
        source: ModelTensors = self.source
        for batch in batches:
            mine = [u for u in batch if source.owner[u.names[0]] == source.rank]
            loaded: dict[str, torch.Tensor] = {}

            def join(batch: list[Unit] = batch, mine: list[Unit] = mine, loaded: dict = loaded) -> None:
                source.join([n for u in batch for n in u.names])
                loaded.update((n, source.tensor(n)) for u in mine for n in u.names)

            try:
                distributed.together(join, "joining tensor-parallel slices")
                yield mine, loaded
            finally:
                source.release()

    def step(self, run: Callable[[], object], what: str) -> None:
        distributed.together(run, what)

    @contextmanager
    def shard_output(self, out: AtomicCheckpointDir, plan: Plan, s: int) -> Iterator[Callable[[dict], None]]:
        """A shard's outputs held by the ranks that made them, then gathered to rank 0, which writes the shard."""
        produced: dict[str, torch.Tensor] = {}
        yield produced.update
        self.step(partial(self.collect, plan, plan.shards[s], produced), "sending to rank 0")
        write = partial(job.write_shard, out, plan, s, produced) if self.source.rank == 0 else _nothing
        self.step(write, "writing a shard")

    def collect(self, plan: Plan, shard: list[Unit], produced: dict[str, torch.Tensor]) -> None:
        """Point-to-point transfer of raw bytes, in an order every rank derives from the plan, into rank 0's
        ``produced`` (a rank's own entries for other ranks are sent and dropped)."""
        source: ModelTensors = self.source
        if source.world == 1:
            return
        for unit in shard:
            owner = source.owner[unit.names[0]]
            if owner == 0:
                continue
            names = [o for n in unit.names for o in output_names(n, plan.fmt)] if unit.quantize else unit.names
            for name in names:
                if source.rank == owner:
                    distributed.send_bytes(produced.pop(name), dst=0)
                elif source.rank == 0:
                    shape, dtype = _output_layout(name, unit, source, plan)
                    buffer = distributed.recv_bytes(int(torch.Size(shape).numel()) * dtype.itemsize, src=owner)
                    produced[name] = buffer.view(dtype).reshape(shape)


def _nothing() -> None:
    pass


def _output_layout(name: str, unit, source: ModelTensors, plan: Plan) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of one output tensor, from the plan alone (the receiver allocates with it)."""
    if not unit.quantize:
        shape, dtype = source.meta[name]
        return shape, SAFETENSORS_DTYPES[dtype]
    base = next(n for n in unit.names if name in output_names(n, plan.fmt))
    layouts = output_layout(source.meta[base][0], plan.fmt, unit.transposed)
    return layouts[output_names(base, plan.fmt).index(name)]


# ---------------------------------------------------------------- loading back


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a checkpoint written here or by ModelOpt; quantized weights are dequantized.

    Refuses anything that is not a complete checkpoint: a missing config, index or shard, or a tensor
    the index lists but no file holds.
    """
    source = SourceCheckpoint(path)
    quant = Path(path) / "hf_quant_config.json"
    fmt = None
    if quant.is_file():
        algo = json.loads(quant.read_text())["quantization"]["quant_algo"]
        fmt = next((f for f in FORMATS.values() if f.quant_algo == algo), None)
        if fmt is None:
            raise CheckpointError(f"{quant}: quant_algo {algo} is not one this loader reads")
    elif source.config.get("quantization_config", {}).get("weight_block_size") == [128, 128]:
        fmt = FORMATS["fp8-block"]
    stored = {name: source.tensor(name) for name in source.names()}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        base = name.removesuffix("_inv").removesuffix("_2").removesuffix("_scale")
        if name.endswith(("_scale", "_scale_2", "_scale_inv")) and base in stored:
            continue
        if fmt is not None and output_names(name, fmt)[1] in stored:
            tensors[name] = dequantize(stored, name, fmt).to(dtype)
        else:
            tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return source.config, tensors

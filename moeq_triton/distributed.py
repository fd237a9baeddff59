"""Cross-rank amax reduction: one all_reduce(MAX) per distinct process group, and no hangs.

ModelOpt issues one all_reduce per quantizer per group (thousands for a large MoE) and has hung
when ranks disagreed about which quantizers exist (ModelOpt issues #831, #862).  Here every value
that must agree over a group travels in one flat float32 buffer per group, and before any data
moves, one all_reduce over the world exchanges a short signature of every rank's buffer layouts.
All ranks evaluate the same table, so either all proceed or all raise the same clear error.

The same module carries every other multi-rank step of the project (``rank_world``, ``agree``,
``together``, ``barrier``, ``send_bytes``/``recv_bytes``, ``gather_objects``): the tensors of each
collective live on the device its backend requires (CUDA for NCCL), chosen once in ``device_for``,
and "agree on failure across ranks, rank 0 commits" is written once.

Order: groups are reduced stage by stage (data parallel, then expert parallel, then tensor parallel,
as ModelOpt does), and within a stage by member ranks.  Every rank thus follows one global order:
no two ranks wait on each other in opposite orders (no deadlock), and a value replicated over a
grid of groups reaches every rank (a rank reducing TP before EP while its EP peer did the reverse
would miss a corner of the grid).  Compute never comes here: this module knows
torch.distributed only, not ModelOpt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

MAX_GROUPS_PER_RANK = 16  # slots per rank in the layout table; more raises on every rank
_FIELDS = 4  # group id, group size, layout hash, number of values

DATA, EXPERT, TENSOR = 0, 1, 2  # stages, in the order they are reduced
Group = tuple[int, "dist.ProcessGroup | None"]  # (stage, process group); None is the world group


@dataclass
class SyncItem:
    """A value that must be equal on every rank of each of its groups."""

    key: str  # identical on every rank holding the same quantity (a quantizer's or a shared scale group's name)
    value: torch.Tensor  # float32, any shape; replaced by the reduced value
    groups: Sequence[Group] = field(default_factory=tuple)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_ranks(group: dist.ProcessGroup | None) -> tuple[int, ...]:
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def _hash(payload: str) -> int:
    """A positive 56-bit integer, exact in int64 sums."""
    return int.from_bytes(hashlib.blake2b(payload.encode(), digest_size=7).digest(), "little")


def device_for(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device for NCCL, else the CPU."""
    return torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")


class PeerFailure(RuntimeError):
    """Raised on the ranks that did not fail themselves when another rank failed a step."""


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment(device_type: str) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1), NCCL for CUDA and gloo for the CPU;
    a CUDA rank takes its LOCAL_RANK's device.  Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank_world()


def agree(step: Callable[[], object], what: str) -> BaseException | None:
    """Run ``step`` on every rank; if it fails on any rank, every rank returns an error (none hangs):
    its own, or a PeerFailure naming the ranks that failed ``what``."""
    failure: BaseException | None = None
    try:
        step()
    except BaseException as error:  # returned to the caller on every rank, which re-raises
        failure = error
    rank, world = rank_world()
    if world > 1:
        flags = torch.zeros(world, dtype=torch.int32)
        flags[rank] = 1 if failure else 0
        flags = flags.to(device_for())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed = flags.cpu().nonzero().flatten().tolist()
        if failed and failure is None:
            failure = PeerFailure(f"rank {', '.join(map(str, failed))} failed while {what}")
    return failure


def together(step: Callable[[], object], what: str) -> None:
    """``step()`` on every rank; when it fails on any rank, every rank raises."""
    failure = agree(step, what)
    if failure is not None:
        raise failure


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def send_bytes(tensor: torch.Tensor, dst: int) -> None:
    """A tensor's raw bytes to rank ``dst`` (no pickling), through the backend's device."""
    dist.send(tensor.detach().contiguous().reshape(-1).view(torch.uint8).to(device_for()), dst=dst)


def recv_bytes(nbytes: int, src: int) -> torch.Tensor:
    """``nbytes`` raw bytes from rank ``src``, returned as a CPU uint8 tensor."""
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device_for())
    dist.recv(buffer, src=src)
    return buffer.cpu()


def gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (small, picklable: names and shapes, never tensors), by rank."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def max_reduce(items: Sequence[SyncItem], member_of: Iterable[Group] = ()) -> int:
    """Reduce every item over its groups with MAX, in place; return the number of collectives issued.

    member_of: groups this rank belongs to even when it holds no item for them (e.g. Megatron's
    data/tensor/expert groups), so that a rank with zero local experts still joins every collective.
    """
    if not active():
        return 0
    # A rank set used at several stages is reduced once, at its earliest stage (a repeat is a no-op).
    stage_of: dict[tuple[int, ...], int] = {}
    group_of: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    for stage, g in [*member_of, *(g for item in items for g in item.groups)]:
        ranks = group_ranks(g)
        if len(ranks) > 1:
            stage_of[ranks] = min(stage, stage_of.get(ranks, stage))
            group_of.setdefault(ranks, g)
    groups = {(stage_of[ranks], ranks): g for ranks, g in group_of.items()}
    members: dict[tuple[int, tuple[int, ...]], list[SyncItem]] = {key: [] for key in groups}
    for item in items:
        for ranks in dict.fromkeys(group_ranks(g) for _, g in item.groups):
            if len(ranks) > 1:
                members[(stage_of[ranks], ranks)].append(item)
    order = sorted(groups)  # one global order: stage first, then member ranks
    for key in order:
        members[key].sort(key=lambda item: item.key)

    _check_layouts({key: members[key] for key in order})
    collectives = 1
    for key in order:
        chosen = members[key]
        if not chosen:
            continue  # the layout check proved every member of this group holds nothing for it
        device = device_for(groups[key])
        buffer = torch.cat([item.value.detach().reshape(-1).float().to(device) for item in chosen])
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=groups[key])
        collectives += 1
        for item, part in zip(chosen, buffer.split([item.value.numel() for item in chosen])):
            item.value = part.to(item.value.device).reshape(item.value.shape)
    return collectives


def _check_layouts(layout: dict[tuple[int, tuple[int, ...]], list[SyncItem]]) -> None:
    """One world all_reduce of every rank's (group, layout) signature; all ranks judge the same table."""
    world, rank = dist.get_world_size(), dist.get_rank()
    table = torch.zeros(world, MAX_GROUPS_PER_RANK, _FIELDS, dtype=torch.int64)
    if len(layout) > MAX_GROUPS_PER_RANK:
        table[rank, 0] = torch.tensor([-1, 0, 0, len(layout)])  # overflow marker, judged by all
    else:
        for slot, (key, chosen) in enumerate(layout.items()):
            signature = "|".join(f"{item.key}:{item.value.numel()}" for item in chosen)
            table[rank, slot] = torch.tensor([_hash(repr(key)), len(key[1]), _hash(signature), len(chosen)])
    device = device_for(None)
    table = table.to(device)
    dist.all_reduce(table, op=dist.ReduceOp.SUM)
    problem = _judge(table.cpu())
    if problem:
        raise RuntimeError(f"moeq-triton amax sync: {problem}")


def _judge(table: torch.Tensor) -> str | None:
    """The same verdict on every rank: each group's members all present, all with one layout."""
    overflow = (table[:, 0, 0] == -1).nonzero().flatten().tolist()
    if overflow:
        return f"ranks {overflow} belong to more than {MAX_GROUPS_PER_RANK} process groups"
    seen: dict[int, list[tuple[int, int, int, int]]] = {}
    for rank in range(table.shape[0]):
        for gid, size, lhash, count in table[rank].tolist():
            if gid:
                seen.setdefault(gid, []).append((rank, size, lhash, count))
    for entries in seen.values():
        size = entries[0][1]
        ranks = [e[0] for e in entries]
        layouts = {(e[2], e[3]) for e in entries}
        if len(entries) != size:
            return (
                f"a process group of {size} ranks was joined by only ranks {ranks}: the other ranks hold "
                "no quantizer reduced over it (different models, configs or parallel layouts per rank?)"
            )
        if len(layouts) > 1:
            counts = {e[0]: e[3] for e in entries}
            return (
                f"ranks {ranks} of one process group disagree about which amaxes to reduce "
                f"(values per rank: {counts}); every rank of a group must quantize the same modules "
                "with the same config"
            )
    return None

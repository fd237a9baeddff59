"""Run a function on N real processes joined by torch.distributed (gloo), with a hard deadline.

Each worker gets (rank, world, *args) after ``init_process_group``; its return value (or the text of
its exception) comes back to the test.  A worker still running at the deadline is killed and the
test fails: a hang becomes a failure, never a stuck CI run.
"""

from __future__ import annotations

import os
import queue as queues
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch.multiprocessing as mp


class WorkerError(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    from tests.seeds import SEED, seed_everything

    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    seed_everything(SEED + rank)  # as in-process tests start from SEED (conftest.py); ranks draw differently
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as error:  # reported to the parent, which decides
        queue.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable, world: int, *args, timeout_s: float = 240.0, env: dict[str, str] | None = None
) -> list[tuple[str, object]]:
    """[(status, value)] by rank; status "ok" with fn's return value, or "error" with its message.

    env: variables set in every worker before it starts (and restored here afterwards).  A worker
    that dies without answering fails the run at once instead of at the deadline."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, timeout_s / 2), daemon=True)
        for r in range(world)
    ]
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    results: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            try:
                rank, status, value = queue.get(timeout=1.0)
                results[rank] = (status, value)
                continue
            except queues.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
            if dead and queue.empty():
                time.sleep(1.0)  # a last answer may still be in flight
                if queue.empty():
                    raise WorkerError(f"ranks {dead} died without answering (exit codes "
                                      f"{[procs[r].exitcode for r in dead]})")  # fmt: skip
            if time.monotonic() > deadline:
                raise WorkerError(f"only ranks {sorted(results)} answered within {timeout_s} s (hang?)")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def values(results: list[tuple[str, object]]) -> list:
    """The return values, or an error with every failing rank's message."""
    failed = [f"rank {r}: {v}" for r, (s, v) in enumerate(results) if s != "ok"]
    if failed:
        raise WorkerError("\n".join(failed))
    return [v for _, v in results]

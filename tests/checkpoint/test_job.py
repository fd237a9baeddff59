"""checkpoint/job.py: the one multi-rank job that ``moeq-triton quantize`` and ``export_hf`` both run.

What the older tests do not pin: that the two callers go through the same job (its steps, its agreement, its
per-batch step), that the exporter's ``batch_bytes`` shapes the batches and never the bytes, and that a failure
in each step of either caller leaves an existing destination exactly as it was.  Multi-rank behaviour (a
failure on one rank) is in test_faults.py and tests/export/test_megatron_export.py (slow tier).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import moeq_triton
from moeq_triton import distributed
from moeq_triton.checkpoint import io, job
from moeq_triton.checkpoint.formats import FORMATS
from moeq_triton.checkpoint.quantize import quantize_checkpoint
from tests.models import tiny_qwen3_moe

SHARD = 20_000  # five output shards of the tiny model (NVFP4)


@pytest.fixture(autouse=True)
def native_kernels(monkeypatch):
    """The orchestration is under test, not the kernels (bitwise tests elsewhere): the CPU reference path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3_moe(layers=2, experts=4)


@pytest.fixture(scope="module")
def source(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny"
    model.save_pretrained(path, max_shard_size="60KB")
    return path


def command(source: Path, out: Path, **kwargs) -> None:
    quantize_checkpoint(source, out, FORMATS["nvfp4"], max_shard_bytes=SHARD, **kwargs)


def export(model, out: Path, **kwargs) -> None:
    moeq_triton.export_hf(model, out, fmt="nvfp4", max_shard_bytes=SHARD, **kwargs)


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def recorded_batches(monkeypatch) -> list[list[job.Unit]]:
    """The units of every call of the job's per-batch step, in order."""
    calls: list[list[job.Unit]] = []
    original = job.quantize_batch

    def recording(units, *args, **kwargs):
        calls.append(list(units))
        return original(units, *args, **kwargs)

    monkeypatch.setattr(job, "quantize_batch", recording)
    return calls


def test_exporter_batch_bytes_shapes_the_batches_not_the_bytes(model, tmp_path, monkeypatch):
    """A small ``batch_bytes`` gives the same files in more batches: each within the budget (a larger unit
    alone), each as full as the budget allows (the next batch's first unit would not have fit), never
    across a shard; the default gives one batch per shard of this small model."""
    batches = recorded_batches(monkeypatch)
    export(model, tmp_path / "large")
    large = list(batches)
    batches.clear()
    budget = 24_000
    export(model, tmp_path / "small", batch_bytes=budget)
    small = list(batches)

    assert files(tmp_path / "small") == files(tmp_path / "large")
    shards = [f for f in files(tmp_path / "large") if f.endswith(".safetensors")]
    assert len(shards) > 2 and len(large) == len(shards)
    shard_of = {tuple(u.names): s for s, units in enumerate(large) for u in units}
    assert [tuple(u.names) for b in small for u in b] == [tuple(u.names) for b in large for u in b]
    assert len(small) > len(large)
    for units in small:
        assert sum(u.held_bytes for u in units) <= budget or len(units) == 1
        assert len({shard_of[tuple(u.names)] for u in units}) == 1
    for units, after in zip(small, small[1:]):
        if shard_of[tuple(units[0].names)] == shard_of[tuple(after[0].names)]:
            assert sum(u.held_bytes for u in units) + after[0].held_bytes > budget


def test_command_and_exporter_run_the_same_job(model, source, tmp_path, monkeypatch):
    """Both callers go through ``job.run_job`` with their own ``Feed`` and quantize every batch in
    ``job.quantize_batch``; every rank agreement comes from the job's three steps (or ``together`` inside
    a feed), none from the callers themselves."""
    feeds: list[job.Feed] = []
    run_job = job.run_job

    def spying_run_job(prepare, feed, **kwargs):
        def spying_feed(plan, src):
            feeds.append(feed(plan, src))
            return feeds[-1]

        return run_job(prepare, spying_feed, **kwargs)

    agreements: list[tuple[str, str]] = []
    agree = distributed.agree

    def spying_agree(step, what):
        caller = sys._getframe(1).f_code
        agreements.append((Path(caller.co_filename).name, caller.co_name))
        return agree(step, what)

    monkeypatch.setattr(job, "run_job", spying_run_job)
    monkeypatch.setattr(distributed, "agree", spying_agree)
    batches = recorded_batches(monkeypatch)

    command(source, tmp_path / "command")
    by_command, agreed_by_command = len(batches), list(agreements)
    export(model, tmp_path / "export")

    assert [type(f).__name__ for f in feeds] == ["CheckpointFeed", "ModelFeed"]
    assert all(isinstance(f, job.Feed) for f in feeds)
    assert by_command > 0 and len(batches) > by_command
    assert agreed_by_command == [("job.py", "run_job")] * 3
    assert agreements.count(("job.py", "run_job")) == 6
    assert set(agreements) == {("job.py", "run_job"), ("distributed.py", "together")}


def fail_preparing(monkeypatch) -> str:
    """The destination's partial directory is created, then the step fails."""
    create = io.AtomicCheckpointDir.create

    def failing(self):
        create(self)
        raise OSError("injected after creating the partial directory")

    monkeypatch.setattr(io.AtomicCheckpointDir, "create", failing)
    return "injected after creating"


def fail_quantizing(monkeypatch) -> str:
    def failing(*args, **kwargs):
        raise MemoryError("injected while quantizing")

    monkeypatch.setattr(job, "quantize_units", failing)
    return "injected while quantizing"


def fail_finishing(monkeypatch) -> str:
    """The metadata is written into the partial directory, then the step fails before the commit."""
    write_metadata = job.write_metadata

    def failing(*args, **kwargs):
        write_metadata(*args, **kwargs)
        raise OSError("injected after writing the metadata")

    monkeypatch.setattr(job, "write_metadata", failing)
    return "injected after writing the metadata"


@pytest.fixture(scope="module")
def previous(model, source, tmp_path_factory) -> dict[str, Path]:
    """A complete earlier output of each caller (fp8, so the failing nvfp4 run would change every shard)."""
    root = tmp_path_factory.mktemp("previous")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        quantize_checkpoint(source, root / "command", FORMATS["fp8"], max_shard_bytes=SHARD)
        moeq_triton.export_hf(model, root / "export", fmt="fp8", max_shard_bytes=SHARD)
    return {"command": root / "command", "export": root / "export"}


@pytest.mark.parametrize("caller", ["command", "export"])
@pytest.mark.parametrize("inject", [fail_preparing, fail_quantizing, fail_finishing], ids=lambda f: f.__name__)
def test_a_failure_in_any_step_leaves_the_destination_as_it_was(
    caller, inject, model, source, previous, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    shutil.copytree(previous[caller], out)
    before = files(out)
    message = inject(monkeypatch)
    with pytest.raises((OSError, MemoryError), match=message):
        if caller == "command":
            command(source, out, overwrite=True)
        else:
            export(model, out, overwrite=True)
    assert files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory, no lock file left

"""The streamed shard writer (checkpoint/shard_file.py) against safetensors' own save_file, byte for byte."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

from moeq_triton.checkpoint.io import SAFETENSORS_DTYPES, AtomicCheckpointDir, CheckpointError
from moeq_triton.checkpoint.shard_file import ShardFile
from tests.seeds import SEED


def every_dtype(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One tensor per dtype torch holds, of shapes 0-dim, empty, odd and large-ish, random bytes; names
    interleaving dtypes (safetensors orders by dtype, then name) with dots, digits and an escaped quote."""
    tensors = {}
    shapes = [(), (0, 16), (3,), (7, 5), (129, 33), (2, 3, 4)]
    for i, (name, dtype) in enumerate(sorted(SAFETENSORS_DTYPES.items())):
        shape = shapes[i % len(shapes)]
        raw = torch.randint(
            0, 256, (int(torch.Size(shape).numel()) * dtype.itemsize,), dtype=torch.uint8, generator=gen
        )
        tensors[f"model.layers.{i % 3}.{name.lower()}.weight"] = raw.view(dtype).reshape(shape)
    tensors['odd "name"\\.x'] = torch.ones(4, dtype=torch.bfloat16)
    return tensors


def layout_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    return {k: (tuple(v.shape), names[v.dtype]) for k, v in tensors.items()}


def test_same_bytes_as_save_file_in_any_order_and_grouping(tmp_path):
    """Every dtype, written in shuffled groups of 1-4 tensors: the file equals save_file's, byte for byte."""
    seed = SEED
    rng = random.Random(seed)
    tensors = every_dtype(torch.Generator().manual_seed(seed))
    save_file(tensors, tmp_path / "theirs.safetensors", {"format": "pt"})
    names = list(tensors)
    rng.shuffle(names)
    with ShardFile(tmp_path / "ours.safetensors", layout_of(tensors), SAFETENSORS_DTYPES, {"format": "pt"}) as shard:
        while names:
            k = rng.randint(1, 4)
            group, names = names[:k], names[k:]
            shard.write({n: tensors[n] for n in group})
    ours, theirs = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "theirs.safetensors").read_bytes()
    assert ours == theirs, f"seed={seed}: {len(ours)} vs {len(theirs)} bytes"


def test_strided_and_non_contiguous_tensors_are_written_as_their_values(tmp_path):
    base = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    tensors = {"t": base.t(), "s": base[:, ::2]}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors")
    with ShardFile(tmp_path / "ours.safetensors", layout_of(tensors), SAFETENSORS_DTYPES, None) as shard:
        shard.write(tensors)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_a_tensor_never_written_or_written_twice_or_unplanned_is_an_error(tmp_path):
    tensors = {"a": torch.ones(2), "b": torch.zeros(3, dtype=torch.bfloat16)}
    layout = layout_of(tensors)
    with pytest.raises(ValueError, match="b was planned but never written"):
        with ShardFile(tmp_path / "x.safetensors", layout, SAFETENSORS_DTYPES, {}) as shard:
            shard.write({"a": tensors["a"]})
    with ShardFile(tmp_path / "y.safetensors", layout, SAFETENSORS_DTYPES, {}) as shard:
        shard.write({"a": tensors["a"]})
        with pytest.raises(ValueError, match="a is not in the shard's layout or was written already"):
            shard.write({"a": tensors["a"]})
        with pytest.raises(ValueError, match=r"b is \[3\] torch.float32, planned \[3\] BF16"):
            shard.write({"b": torch.zeros(3)})
        shard.write({"b": tensors["b"]})


def test_write_error_names_the_shard_and_the_reason(tmp_path, monkeypatch):
    """An OSError of the writer thread (here ENOSPC from pwrite) is one CheckpointError naming the file."""
    import errno
    import os

    from moeq_triton.checkpoint import shard_file

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = AtomicCheckpointDir(tmp_path / "out", False, protect=[], run_id="test")
    out.create()
    monkeypatch.setattr(shard_file.os, "pwrite", full)
    tensors = {"a": torch.ones(2)}
    with pytest.raises(CheckpointError, match=r"out/m\.safetensors: write failed \(No space left on device\)"):
        with out.open_shard("m.safetensors", layout_of(tensors)) as shard:
            shard.write(tensors)
    out.abort()

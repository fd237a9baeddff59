"""A safetensors shard written as its tensors arrive, byte for byte what ``safetensors.torch.save_file`` writes.

The command knows every output tensor's name, dtype and shape from its plan, so the header (and so each
tensor's offset) is known before the first tensor is quantized.  Each batch's tensors are then written at
their offsets by a writer thread while the next batch is quantized: the shard is never assembled in memory
(save_file takes every tensor of it at once), and the write overlaps the compute.  The tensor order and the
header's spelling are safetensors' own: the header is what ``safetensors.torch.save`` gives for one-element
stand-ins of the same names and dtypes (its order depends on dtype and name only), with the real shapes and
offsets put in.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save

Layout = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype name)


class ShardWriteError(Exception):
    """An OSError of the shard's own file (open, write, close), apart from any other error in the caller's block."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def header(layout: Layout, dtypes: dict[str, torch.dtype], metadata: dict[str, str] | None) -> tuple[bytes, dict]:
    """The file's first bytes (length and JSON header, padded as safetensors pads it) and each tensor's
    (start, end) offset in the data that follows.  ``dtypes``: safetensors dtype name -> torch dtype."""
    raw = save({name: torch.zeros(1, dtype=dtypes[dtype]) for name, (_, dtype) in layout.items()}, metadata)
    entries = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        shape, dtype = layout[name]
        size = int(torch.Size(shape).numel()) * dtypes[dtype].itemsize
        entry["shape"], entry["data_offsets"] = list(shape), [offset, offset + size]
        offsets[name] = (offset, offset + size)
        offset += size
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` at ``offset`` (pwrite may write less than asked)."""
    while len(data):
        try:
            written = os.pwrite(fd, data, offset)
        except OSError as error:
            raise ShardWriteError(error) from None
        data, offset = data[written:], offset + written


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order, without a copy when it is contiguous on the CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()) if flat.numel() else memoryview(b"")


class ShardFile:
    """``with ShardFile(path, layout, dtypes, metadata) as shard: shard.write(tensors); ...``: each tensor of the
    layout written exactly once, in any order and any grouping; at most one call's tensors in flight (held by
    the writer thread) while the caller computes the next.  A write error (ENOSPC, ...) is raised by the next
    ``write`` or by the end of the block; a tensor of the layout never written is an error at the end."""

    def __init__(
        self, path: Path, layout: Layout, dtypes: dict[str, torch.dtype], metadata: dict[str, str] | None
    ) -> None:
        self.path, self.layout, self.dtypes = path, layout, dtypes
        self.missing = set(layout)
        self.offsets: dict[str, int] = {}
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as error:
            raise ShardWriteError(error) from None
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeq-shard-writer")
        # the header (about 40 ms for 800 tensors) is made on the writer thread, beside the first batch's compute
        self.pending: Future | None = self.writer.submit(self._start, metadata)

    def _start(self, metadata: dict[str, str] | None) -> None:
        head, offsets = header(self.layout, self.dtypes, metadata)
        self.offsets = {name: len(head) + start for name, (start, _) in offsets.items()}
        write_at(self.fd, memoryview(head), 0)

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue ``tensors`` (names of the layout, each with its layout's shape and dtype) for writing."""
        for name, tensor in tensors.items():
            if name not in self.missing:
                raise ValueError(f"{self.path.name}: {name} is not in the shard's layout or was written already")
            shape, dtype = self.layout[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != self.dtypes[dtype]:
                raise ValueError(
                    f"{self.path.name}: {name} is {list(tensor.shape)} {tensor.dtype}, planned {list(shape)} {dtype}"
                )
            self.missing.discard(name)
        self._wait()
        chunks = [(n, tensor_bytes(t)) for n, t in tensors.items()]
        self.pending = self.writer.submit(self._write_all, chunks)

    def _write_all(self, chunks: list[tuple[str, memoryview]]) -> None:
        for name, data in chunks:
            write_at(self.fd, data, self.offsets[name])

    def _wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def _close(self) -> None:
        self.writer.shutdown(wait=True)  # a write in flight ends before the file is closed (or removed)
        try:
            os.close(self.fd)
        except OSError as error:
            raise ShardWriteError(error) from None

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self._wait()
                if self.missing:
                    raise ValueError(f"{self.path.name}: {sorted(self.missing)[0]} was planned but never written")
        finally:
            self._close()

"""Reading a Hugging Face safetensors checkpoint lazily and writing one atomically.

No pickle anywhere: tensors are read with ``safe_open`` one at a time and written with safetensors.
A destination is either complete or absent: everything is written into a hidden sibling directory
that is renamed into place at the very end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
EXTRA_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
}
"""safetensors' dtype names (as shards and ``get_slice`` spell them) and the torch dtypes they hold."""


class CheckpointError(ValueError):
    """An expected failure about the checkpoint itself; the message names the file or tensor."""


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class SourceCheckpoint:
    """config.json plus safetensors shards (with or without an index), read tensor by tensor."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        config = self.path / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{config}: not found (expected a Hugging Face model directory)")
        self.config = json.loads(config.read_text())
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{self.path}: no {INDEX} or {SINGLE}")
        self._handles: dict[str, object] = {}
        if weight_map is None:
            weight_map = dict.fromkeys(self._open(SINGLE).keys(), SINGLE)
        self.weight_map: dict[str, str] = weight_map
        for file in sorted(set(weight_map.values())):
            names = set(self._open(file).keys())
            missing = [n for n, f in weight_map.items() if f == file and n not in names]
            if missing:
                raise CheckpointError(f"{self.path / file}: lacks {missing[0]} listed in the index")

    def _open(self, file: str):
        if file not in self._handles:
            path = self.path / file
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def where(self, name: str) -> str:
        """How errors name a tensor's origin: its file."""
        return str(self.path / self.weight_map[name])

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        piece = self._open(self.weight_map[name]).get_slice(name)
        return tuple(piece.get_shape()), piece.get_dtype()

    def nbytes(self, name: str) -> int:
        shape, dtype = self.shape_dtype(name)
        return SAFETENSORS_DTYPES[dtype].itemsize * int(torch.Size(shape).numel())

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._open(self.weight_map[name]).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"{self.path / self.weight_map[name]}: cannot read {name} ({error})") from None

    def extra_files(self) -> Iterator[Path]:
        for name in EXTRA_FILES:
            if (self.path / name).is_file():
                yield self.path / name


class AtomicCheckpointDir:
    """Write into ``.<name>.partial`` beside the destination; ``commit`` renames it into place."""

    def __init__(self, destination: str | os.PathLike, overwrite: bool = False) -> None:
        self.destination = Path(destination)
        if self.destination.exists() and (not self.destination.is_dir() or any(self.destination.iterdir())):
            if not overwrite:
                raise CheckpointError(f"{self.destination}: exists and is not empty (pass --overwrite to replace it)")
        self.overwrite = overwrite
        self.partial = self.destination.parent / f".{self.destination.name}.partial"

    def create(self) -> Path:
        """A fresh partial directory (a stale one from an interrupted run is discarded)."""
        try:
            self.destination.parent.mkdir(parents=True, exist_ok=True)
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.mkdir()
        except OSError as error:
            raise CheckpointError(f"{self.destination}: cannot write there ({error.strerror or error})") from None
        return self.partial

    def write_shard(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        try:
            save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, self.partial / file, {"format": "pt"})
        except OSError as error:
            raise CheckpointError(f"{self.partial / file}: write failed ({error.strerror or error})") from None

    def write_json(self, file: str, obj: dict) -> None:
        (self.partial / file).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def commit(self) -> None:
        """Rename into place; with overwrite, the old directory goes only after the new one is in."""
        old = self.destination.parent / f".{self.destination.name}.old"
        if self.destination.exists():
            if old.exists():
                shutil.rmtree(old)
            self.destination.rename(old)
        self.partial.rename(self.destination)
        if old.exists():
            shutil.rmtree(old)

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

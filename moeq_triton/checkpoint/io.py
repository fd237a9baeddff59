"""Reading a Hugging Face safetensors checkpoint lazily and writing one atomically.

No pickle anywhere: tensors are read with ``safe_open`` one at a time and written with safetensors.
A destination is either complete or as it was: everything is written into a hidden sibling directory
(its name unique to the run) that is renamed into place at the very end (signals deferred during the
renames), and the sibling is removed on any failure.  One run per destination: an exclusive ``flock`` on a
lock file beside it is held from the creation of the partial to the end (the kernel releases it when
the process dies, so a lock that can be taken proves that no run is writing there).  ``--overwrite``
replaces only an empty directory or one this tool wrote (recognized by the manifest in its index, which
lists every file it wrote), never a file, never a directory holding anything else, and never the source.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moeq_triton.checkpoint.shard_file import ShardFile, ShardWriteError
from moeq_triton.version import __version__

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
    "BOOL": torch.bool,
    "I16": torch.int16,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E5M2": torch.float8_e5m2,
    **({"F8_E8M0": torch.float8_e8m0fnu} if hasattr(torch, "float8_e8m0fnu") else {}),
}
"""safetensors' dtype names (as shards and ``get_slice`` spell them) and the torch dtypes they hold: every
one torch can hold, so that any tensor that is not the weight of a quantized linear is carried through."""


MANIFEST_KEY = "moeq_triton"
"""Key of the manifest in the index's ``metadata``: ``{"version": ..., "files": [...]}``."""
PARTIAL_MARK = ".moeq-triton-partial"
"""Written first into a partial directory: a stale partial is ours to discard only if it holds this."""
LOCK_SUFFIX = ".moeq-triton-lock"
"""``.NAME.moeq-triton-lock`` beside the destination: flock'ed by the run writing NAME, holding its pid."""


class CheckpointError(ValueError):
    """An expected failure about the checkpoint itself; the message names the file or tensor."""


def read_json(path: Path, kind: type = dict) -> dict:
    """A JSON file that must hold a ``kind`` (an object by default); errors name the file."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({getattr(error, 'strerror', None) or error})") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                              f"found {type(value).__name__}")  # fmt: skip
    return value


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class SourceCheckpoint:
    """config.json plus safetensors shards (with or without an index), read tensor by tensor."""

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            self._read(Path(path))
        except OSError as error:  # a name too long, a directory that cannot be listed
            raise CheckpointError(f"{path}: cannot read ({_os_reason(error)})") from None

    def _read(self, path: Path) -> None:
        self.path = path
        config = self.path / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{config}: not found (expected a Hugging Face model directory)")
        self.config = read_json(config)
        if (self.path / INDEX).is_file():
            weight_map = read_json(self.path / INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise CheckpointError(f"{self.path / INDEX}: no weight_map of tensor name -> shard file name")
            outside = next((k for k, v in weight_map.items() if "/" in v or v in ("", ".", "..")), None)
            if outside is not None:
                raise CheckpointError(
                    f"{self.path / INDEX}: weight_map entry {outside} -> {weight_map[outside]!r} is not a file name "
                    "in the checkpoint directory (shards are read only from there)"
                )
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            raise CheckpointError(f"{self.path}: no {INDEX} or {SINGLE}")
        self._handles: dict[str, object] = {}
        if weight_map is None:
            weight_map = dict.fromkeys(self._open(SINGLE).keys(), SINGLE)
        self.weight_map: dict[str, str] = weight_map
        self.unindexed: list[str] = []  # tensors in a shard that the index does not list (loaders skip them)
        for file in sorted(set(weight_map.values())):
            names = set(self._open(file).keys())
            missing = [n for n, f in weight_map.items() if f == file and n not in names]
            if missing:
                raise CheckpointError(f"{self.path / file}: lacks {missing[0]} listed in the index")
            self.unindexed += sorted(f"{n} (in {file})" for n in names if weight_map.get(n) != file)

    def _open(self, file: str):
        if file not in self._handles:
            path = self.path / file
            try:
                with open(path, "rb"):  # the OS's own reason (permission denied, ...), which safetensors hides
                    pass
                self._handles[file] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def where(self, name: str) -> str:
        """How errors name a tensor's origin: its file (for one expert's slice of a stacked tensor on disk,
        the file and the stacked tensor)."""
        if name in self.weight_map:
            return str(self.path / self.weight_map[name])
        per_expert = re.fullmatch(r"(.*)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if per_expert:
            base, expert, leaf = per_expert.groups()
            stacked = f"{base}.{'down_proj' if leaf == 'down_proj' else 'gate_up_proj'}"
            if stacked in self.weight_map:
                return f"{self.path / self.weight_map[stacked]} ({stacked}[{expert}])"
        return str(self.path)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        piece = self._open(self.weight_map[name]).get_slice(name)
        return tuple(piece.get_shape()), piece.get_dtype()

    def nbytes(self, name: str) -> int:
        shape, dtype = self.shape_dtype(name)
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.where(name)}: tensor {name} has dtype {dtype}, which torch cannot hold")
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


def refuse_overlap(destination: str | os.PathLike, source: str | os.PathLike) -> None:
    """The source is never written: refuse a destination equal to, inside or containing it (symlinks
    resolved)."""
    d, src = Path(os.path.realpath(destination)), Path(os.path.realpath(source))
    how = "is" if d == src else "is inside" if src in d.parents else "contains" if d in src.parents else None
    if how:
        raise CheckpointError(
            f"{destination}: {how} the source checkpoint {source}; the source is never written, "
            "choose a destination outside it"
        )


def manifest(directory: Path) -> dict | None:
    """The manifest of a checkpoint this tool wrote (None when there is none)."""
    try:
        record = json.loads((directory / INDEX).read_text()).get("metadata", {}).get(MANIFEST_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("files"), list)
    return record if ok else None


def _os_reason(error: BaseException) -> str:
    """'No space left on device' from an OSError or from safetensors' wrapped IoError."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    found = re.search(r'I/O error: (.+?) \(os error \d+\)|message: "([^"]+)"', str(error))
    return (found.group(1) or found.group(2)) if found else str(error)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM that arrive inside the block are delivered when it ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda n, _frame: received.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for number in dict.fromkeys(received):
            handler = previous[number]
            if callable(handler):
                # called here, not re-raised: a re-raised signal runs its Python handler at some
                # later bytecode check (possibly inside a GC finalizer, where an exception is dropped)
                handler(number, None)
            elif handler != signal.SIG_IGN:
                signal.raise_signal(number)


class RunLock:
    """An exclusive ``fcntl.flock`` on ``path`` (created if needed) that records the holder's pid.

    The kernel drops the lock when the holder dies, however it dies, so a lock taken proves that no
    other run holds it.  ``release`` removes the file while still holding the lock; ``acquire`` checks
    that the file it locked is still the one at ``path`` (a holder may have removed it meanwhile).
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what  # how the error names the locked thing
        self.fd: int | None = None

    def acquire(self, wait: bool = False) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise CheckpointError(
                    f"{self.what}: another moeq-triton run ({self.holder()}) is writing it "
                    f"(lock {self.path}); wait for it to end or choose another destination"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self.fd = fd

    def holder(self) -> str:
        """'pid N' of the run holding the lock (it writes its pid right after locking: retried briefly)."""
        for _ in range(20):
            try:
                text = self.path.read_text().strip()
            except OSError:
                text = ""
            if text:
                return text
            time.sleep(0.01)
        return "pid unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def lock_path(destination: Path) -> Path:
    return destination.parent / f".{destination.name}{LOCK_SUFFIX}"


class AtomicCheckpointDir:
    """Write into ``.<name>.moeq-triton-partial-<pid>-<random>`` beside the destination; ``commit`` renames it
    into place.

    ``protect``: directories that must never be written (the source); a destination equal to, inside
    or containing one is refused.  Every rank may construct it (each checks the destination); rank 0
    creates, commits or aborts; ``run_id`` (rank 0's, shared with the others) names the partial directory.
    From ``create`` to ``commit``/``abort`` the creating process holds the destination's RunLock.
    """

    def __init__(
        self,
        destination: str | os.PathLike,
        overwrite: bool = False,
        protect: Sequence[str | os.PathLike] = (),
        run_id: str | None = None,
    ) -> None:
        self.destination = Path(destination)
        if not self.destination.name or self.destination.name in (".", ".."):
            raise CheckpointError(f"{destination!r}: not a directory name to write to (name the output directory)")
        for source in protect:
            refuse_overlap(self.destination, source)
        self.overwrite = overwrite
        self.run_id = run_id or new_run_id()
        self.partial = self.destination.parent / f".{self.destination.name}{PARTIAL_MARK}-{self.run_id}"
        self.old = self.destination.parent / f".{self.destination.name}.moeq-triton-old-{self.run_id}"
        self.lock = RunLock(lock_path(self.destination), str(self.destination))
        self.created = False  # abort removes the partial directory only if this object made it
        self.check_destination()

    def check_destination(self) -> None:
        """Refuse what must not be replaced; run again just before the commit."""
        dest = self.destination
        try:
            if dest.is_symlink():
                raise CheckpointError(f"{dest}: is a symbolic link; name the directory itself")
            if dest.exists() and not dest.is_dir():
                raise CheckpointError(f"{dest}: exists and is not a directory; it is never replaced")
            blocker = next((p for p in dest.parents if p.exists() and not p.is_dir()), None)
            if blocker is not None:
                raise CheckpointError(f"{dest}: cannot write there ({blocker} is a file, not a directory)")
            if not dest.is_dir() or not any(dest.iterdir()):
                return
        except OSError as error:  # a name too long, a directory that cannot be read
            raise CheckpointError(f"{dest}: cannot write there ({_os_reason(error)})") from None
        if not self.overwrite:
            raise CheckpointError(f"{dest}: exists and is not empty (pass --overwrite to replace it)")
        record = manifest(dest)
        if record is None:
            raise CheckpointError(
                f"{dest}: not written by moeq-triton (no manifest in its {INDEX}); "
                "--overwrite replaces only such a directory or an empty one: remove it yourself"
            )
        foreign = sorted(set(os.listdir(dest)) - set(record["files"]))
        if foreign:
            raise CheckpointError(
                f"{dest}: holds {foreign[0]}, which moeq-triton did not write; not replaced (move it away first)"
            )

    def stale(self) -> list[Path]:
        """Partial and old directories of this destination left by killed runs (this tool's marks only).
        Only called with the lock held: no live run can own them."""
        parent, name = self.destination.parent, self.destination.name
        found = []
        for entry in sorted(parent.glob(f".{glob_escape(name)}{PARTIAL_MARK}*")):
            if entry.is_dir() and not entry.is_symlink() and (entry / PARTIAL_MARK).is_file():
                found.append(entry)
        for entry in sorted(parent.glob(f".{glob_escape(name)}.moeq-triton-old*")):
            if entry.is_dir() and not entry.is_symlink() and manifest(entry) is not None:
                found.append(entry)
        return found

    def create(self) -> Path:
        """Take the destination's lock (one run per destination), discard the partials of killed runs,
        make this run's partial directory.  Signals are held back so that nothing is left half-made."""
        with signals_deferred():
            try:
                self.destination.parent.mkdir(parents=True, exist_ok=True)
                self.lock.acquire()
                for stale in self.stale():
                    if ".moeq-triton-old" in stale.name and not self.destination.exists():
                        stale.rename(self.destination)  # killed between the commit's renames: the old one is back
                    else:
                        shutil.rmtree(stale)
                self.partial.mkdir()
                self.created = True
                (self.partial / PARTIAL_MARK).touch()
            except CheckpointError:
                self.abort()
                raise
            except OSError as error:
                self.abort()
                raise CheckpointError(f"{self.destination}: cannot write there ({_os_reason(error)})") from None
        return self.partial

    def write_shard(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        try:
            save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, self.partial / file, {"format": "pt"})
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{self.destination / file}: write failed ({_os_reason(error)})") from None

    @contextmanager
    def open_shard(self, file: str, layout: dict[str, tuple[tuple[int, ...], str]]) -> Iterator[ShardFile]:
        """A shard written as its tensors arrive (``ShardFile``; the same bytes as ``write_shard``): ``layout``
        names every tensor it will hold, with its shape and safetensors dtype name."""
        try:
            with ShardFile(self.partial / file, layout, SAFETENSORS_DTYPES, {"format": "pt"}) as shard:
                yield shard
        except ShardWriteError as error:
            raise CheckpointError(f"{self.destination / file}: write failed ({_os_reason(error.error)})") from None

    def write_json(self, file: str, obj: dict) -> None:
        try:
            (self.partial / file).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        except OSError as error:
            raise CheckpointError(f"{self.destination / file}: write failed ({_os_reason(error)})") from None

    def copy_file(self, path: Path) -> None:
        try:
            shutil.copy2(path, self.partial / path.name)
        except OSError as error:
            raise CheckpointError(f"{self.destination / path.name}: write failed ({_os_reason(error)})") from None

    def write_index(self, index: dict) -> None:
        """The index, written last: its metadata carries the manifest of every file written."""
        files = sorted({*os.listdir(self.partial), INDEX} - {PARTIAL_MARK})
        metadata = {**index.get("metadata", {}), MANIFEST_KEY: {"version": __version__, "files": files}}
        self.write_json(INDEX, {**index, "metadata": metadata})

    def commit(self, then: Callable[[], None] = lambda: None) -> None:
        """Rename into place; with overwrite, the old directory goes only after the new one is in.
        ``then`` runs right after, before a signal deferred during the renames is delivered."""
        try:
            self.check_destination()  # the destination may have changed while this run worked
        except CheckpointError:
            self.abort()
            raise
        with signals_deferred():
            try:
                (self.partial / PARTIAL_MARK).unlink()
                if self.destination.exists():
                    self.destination.rename(self.old)
                self.partial.rename(self.destination)
            except OSError as error:
                if self.old.exists() and not self.destination.exists():
                    self.old.rename(self.destination)
                self.abort()
                raise CheckpointError(f"{self.destination}: cannot move the output into place ({error})") from None
            self.created = False  # the partial is the destination now
            shutil.rmtree(self.old, ignore_errors=True)
            self.lock.release()
            then()

    def abort(self) -> None:
        """Remove the partial directory this object made (nothing else) and release the lock; signals are
        held back meanwhile, so a second Ctrl-C cannot leave a half-removed directory behind."""
        with signals_deferred():
            if self.created:
                shutil.rmtree(self.partial, ignore_errors=True)
                self.created = False
            self.lock.release()


def new_run_id() -> str:
    """What makes a partial directory's name unique to its run: the pid and 32 random bits."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def glob_escape(name: str) -> str:
    return re.sub(r"([*?[])", r"[\1]", name)

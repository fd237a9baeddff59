"""Fault matrix of ``moeq-triton quantize``: each fault x exit code x what must remain on disk.

One table (FAULTS) drives one test.  Every row starts from a fresh copy of one tiny Qwen3-MoE checkpoint
(built once, seeded, from safetensors directly), runs the command (in-process where it can; a real
subprocess for real signals; real gloo processes for multi-rank rows) and then checks the exit code,
that stderr names what went wrong in one line without a traceback, and the disk:
- "as before": every file and directory under the test's folder is byte-identical to before the run
  (the source, the destination, and no hidden sibling left behind);
- "complete": the destination is a complete checkpoint whose manifest lists exactly its
  files, and everything else is as before.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeq_triton import cli
from moeq_triton.checkpoint.io import INDEX, AtomicCheckpointDir, SourceCheckpoint, manifest
from tests.distributed_harness import run_ranks, values

SEED = 0
HIDDEN, FFN, VOCAB, EXPERTS, LAYERS = 32, 16, 64, 2, 2
SLOW = pytest.mark.slow  # a subprocess or several processes: start-up alone is a few seconds here


def tiny_tensors() -> dict[str, torch.Tensor]:
    """Qwen3-MoE names and layouts, small shapes (last dims multiples of 16), seeded heavy-tailed values."""
    gen = torch.Generator().manual_seed(SEED)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN)}
    shapes["model.norm.weight"] = (HIDDEN,)
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        shapes |= {f"{p}.input_layernorm.weight": (HIDDEN,), f"{p}.post_attention_layernorm.weight": (HIDDEN,)}
        shapes |= {f"{p}.self_attn.{n}_proj.weight": (HIDDEN if n in "qo" else FFN, HIDDEN) for n in "qkvo"}
        shapes |= {f"{p}.self_attn.q_norm.weight": (FFN,), f"{p}.self_attn.k_norm.weight": (FFN,)}
        shapes[f"{p}.mlp.gate.weight"] = (EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            shapes |= {f"{p}.mlp.experts.{e}.{n}_proj.weight": (FFN, HIDDEN) for n in ("gate", "up")}
            shapes[f"{p}.mlp.experts.{e}.down_proj.weight"] = (HIDDEN, FFN)
    return {n: ((torch.randn(s, generator=gen) ** 3) * 0.02).to(torch.bfloat16) for n, s in sorted(shapes.items())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The source: config.json, a tokenizer file, three shards and their index."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-qwen3-moe"
    path.mkdir()
    tensors = tiny_tensors()
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        part = names[i::3]
        save_file({n: tensors[n] for n in part}, path / file, {"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def prior(tiny, tmp_path_factory) -> Path:
    """A complete earlier output of this tool."""
    out = tmp_path_factory.mktemp("prior") / "out"
    assert cli.main(["quantize", "--model", str(tiny), "--out", str(out), "--device", "cpu"]) == 0
    return out


def snapshot(root: Path, skip: Path | None = None) -> dict[str, object]:
    """Every entry under root: file bytes, 'dir', or the link target (``skip``'s contents left out)."""
    found: dict[str, object] = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(here) / name
            if skip is not None and skip in path.parents:
                continue
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = path.read_bytes()
    return found


def assert_complete(out: Path) -> None:
    """A checkpoint that loads, every tensor readable, and a manifest listing exactly its files."""
    checkpoint = SourceCheckpoint(out)
    assert len(checkpoint.names()) > 20
    for name in checkpoint.names():
        checkpoint.tensor(name)
    record = manifest(out)
    assert record is not None and sorted(record["files"]) == sorted(os.listdir(out)), record
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization.get("quant_algo", quantization["quant_method"]) in ("W4A16_NVFP4", "fp8"), quantization


# ---------------------------------------------------------------- preparing each fault


def corrupt(path: Path, edit: Callable[[dict[str, torch.Tensor]], None], tensor: str) -> None:
    """Rewrite the shard holding ``tensor`` after ``edit`` changed its tensors."""
    file = path / json.loads((path / INDEX).read_text())["weight_map"][tensor]
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, {"format": "pt"})


def set_nan(name: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[name][1, 3] = float("nan")

    return edit


def shard_of(src: Path, tensor: str) -> str:
    return json.loads((src / INDEX).read_text())["weight_map"][tensor]


def to_dev_full(method: str, when: Callable[[str], bool]) -> Callable:
    """Fault injection: before AtomicCheckpointDir.<method> writes a chosen file, that file becomes a link
    to /dev/full, so the real write fails with the kernel's ENOSPC (No space left on device).  (Not for
    shards: safetensors writes a temporary file and renames it over the link.)"""

    def install(monkeypatch) -> None:
        original = getattr(AtomicCheckpointDir, method)

        def writing(self, file, *args):
            if when(file):
                os.symlink("/dev/full", self.partial / file)
            return original(self, file, *args)

        monkeypatch.setattr(AtomicCheckpointDir, method, writing)

    return install


MOUNTS: list[Path] = []  # unmounted after each test


def full_disk(directory: Path, size: str = "8k") -> Path:
    """A real small tmpfs mounted at ``directory``: writes beyond ``size`` fail with ENOSPC from the kernel."""
    directory.mkdir()
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True)
    if run.returncode:
        pytest.skip(f"mounting a small tmpfs needs root (CAP_SYS_ADMIN): {run.stderr.decode().strip()}")
    MOUNTS.append(directory)
    return directory


HOLDERS: list[subprocess.Popen] = []  # processes holding a lock for a row, ended after it


def lock_held_by_another_process(lock: Path) -> subprocess.Popen:
    """A real process that holds ``lock`` as a running moeq-triton would (flock, its pid inside), until killed."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'pid {os.getpid()}\\n'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    HOLDERS.append(holder)
    assert holder.stdout.readline() == "locked\n"
    return holder


def no_c_compiler(monkeypatch) -> None:
    """No compiler and nothing cached: the fast CPU path cannot be built (as on a machine without cc)."""
    from moeq_triton.kernels import native

    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("MOEQ_TRITON_CACHE", os.environ["FAULT_EMPTY_CACHE"])
    native.library.cache_clear()


@dataclass
class Fault:
    id: str
    prepare: Callable[[Path, Path, Path, Path], list[str]]  # (tmp, src, out, prior) -> argv after the defaults
    code: int
    says: str
    after: str  # "as before" | "complete"
    inject: Callable | None = None  # in-process fault injection (given monkeypatch)
    signal_at: str | None = None  # a real signal sent to a subprocess at this phase
    ranks: str | None = None  # a 2-process run: "fail-rank-1" or "nccl"
    argv: Callable[[Path, Path], list[str]] | None = None  # replaces the default argv
    marks: list = field(default_factory=list)


def defaults(src: Path, out: Path) -> list[str]:
    return ["quantize", "--model", str(src), "--out", str(out), "--device", "cpu", "--max-shard-size", "8KB"]


def with_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def bad_source_file(id: str, file: str, text: str, says: str) -> Fault:
    """The source's ``file`` rewritten as ``text``: refused with exit 1 naming it, the destination as before."""
    return Fault(id, lambda t, s, o, p: (with_file(s / file, text), [])[1], 1, says, "as before")


def copy_prior(prior: Path, out: Path, extra: str | None = None) -> None:
    shutil.copytree(prior, out)
    if extra:
        (out / extra).write_text("the user's own notes")


def without_architectures(config: Path) -> None:
    data = json.loads(config.read_text())
    assert data.pop("architectures") and data["model_type"] == "qwen3_moe"
    config.write_text(json.dumps(data))


N = lambda *a: []  # noqa: E731  (no change to the defaults)

FAULTS = [
    # item 1: the source is never written
    Fault(
        "out-is-source",
        lambda t, s, o, p: ["--out", str(s), "--overwrite", "--verify"],
        1,
        "is the source",
        "as before",
    ),
    Fault(
        "out-inside-source",
        lambda t, s, o, p: ["--out", str(s / "q"), "--overwrite"],
        1,
        "is inside the source",
        "as before",
    ),
    Fault(
        "out-contains-source",
        lambda t, s, o, p: ["--out", str(t), "--overwrite"],
        1,
        "contains the source",
        "as before",
    ),
    Fault(
        "out-links-to-source",
        lambda t, s, o, p: (os.symlink(s, t / "link"), ["--out", str(t / "link" / "q")])[1],
        1,
        "is inside the source",
        "as before",
    ),
    Fault(
        "source-through-link",
        lambda t, s, o, p: (os.symlink(s, t / "link"), ["--model", str(t / "link"), "--out", str(s), "--overwrite"])[1],
        1,
        "is the source",
        "as before",
    ),
    # item 2: --overwrite replaces only an empty directory or one this tool wrote, never a file
    Fault(
        "out-is-a-file",
        lambda t, s, o, p: (with_file(o, "mine"), ["--overwrite"])[1],
        1,
        "not a directory",
        "as before",
    ),
    Fault("out-is-a-link", lambda t, s, o, p: (os.symlink(t / "elsewhere", o), [])[1], 1, "symbolic link", "as before"),
    Fault(
        "out-foreign-dir",
        lambda t, s, o, p: (with_file(o / "keep.txt", "mine"), ["--overwrite"])[1],
        1,
        "not written by moeq-triton",
        "as before",
    ),
    Fault(
        "out-ours-plus-foreign-file",
        lambda t, s, o, p: (copy_prior(p, o, "notes.txt"), ["--overwrite"])[1],
        1,
        "notes.txt, which moeq-triton did not write",
        "as before",
    ),
    Fault("out-ours-replaced", lambda t, s, o, p: (copy_prior(p, o), ["--overwrite"])[1], 0, "", "complete"),
    Fault("out-empty-dir", lambda t, s, o, p: (o.mkdir(), [])[1], 0, "", "complete"),
    Fault(
        "existing-destination",
        lambda t, s, o, p: (with_file(o / "keep.txt", "mine"), [])[1],
        1,
        "pass --overwrite",
        "as before",
    ),
    Fault(
        "unwritable-destination",
        lambda t, s, o, p: ["--out", str(with_file(t / "blocker", "x") / "out")],
        1,
        "cannot write there",
        "as before",
    ),
    Fault(  # partial names are unique to each run: a directory of the user's there is simply left alone
        "foreign-partial-sibling",
        lambda t, s, o, p: (with_file(t / ".out.moeq-triton-partial" / "x", "mine"), [])[1],
        0,
        "",
        "complete",
    ),
    Fault(
        "stale-partial-of-ours",
        lambda t, s, o, p: (with_file(t / ".out.moeq-triton-partial" / ".moeq-triton-partial", ""), [])[1],
        0,
        "",
        "complete",
    ),
    # issue 23 item 1: one run per destination (the lock is a real flock held by another process)
    Fault(
        "destination-locked-by-another-run",
        lambda t, s, o, p: (lock_held_by_another_process(t / ".out.moeq-triton-lock"), [])[1],
        1,
        "out: another moeq-triton run (pid ",
        "as before",
    ),
    Fault(  # a killed run leaves its lock file and its partial; the lock is free, so both are discarded
        "killed-run-leftovers",
        lambda t, s, o, p: (
            with_file(t / ".out.moeq-triton-partial-4242-0badf00d" / ".moeq-triton-partial", ""),
            with_file(t / ".out.moeq-triton-partial-4242-0badf00d" / "model-00001-of-00009.safetensors", "half"),
            with_file(t / ".out.moeq-triton-lock", "pid 4242\n"),
            [],
        )[-1],
        0,
        "",
        "complete",
    ),
    Fault(
        "cache-below-a-regular-file",
        N,
        1,
        "cannot create the default checkpoint in the cache",
        "as before",
        inject=lambda mp: mp.setenv("MOEQ_TRITON_CACHE", os.environ["FAULT_TMP"] + "/blocker/cache"),
        argv=lambda s, o: (with_file(o.parent / "blocker", "x"), ["quantize", "--out", str(o), "--device", "cpu"])[1],
    ),
    Fault(  # killed between the commit's two renames: the previous output is back first, then replaced
        "killed-between-commit-renames",
        lambda t, s, o, p: (shutil.copytree(p, t / ".out.moeq-triton-old-4242-0badf00d"), ["--overwrite"])[1],
        0,
        "",
        "complete",
    ),
    # item 3: bad JSON
    bad_source_file("config-invalid-json", "config.json", "{oops", "config.json: invalid JSON"),
    bad_source_file("index-invalid-json", INDEX, "[1,", f"{INDEX}: invalid JSON"),
    bad_source_file("config-is-a-list", "config.json", "[]", "config.json: expected a JSON object, found list"),
    bad_source_file("index-without-weight-map", INDEX, "{}", "no weight_map"),
    # existing: the source's files
    Fault(
        "missing-config",
        lambda t, s, o, p: ((s / "config.json").unlink(), [])[1],
        1,
        "config.json: not found",
        "as before",
    ),
    Fault(
        "truncated-shard",
        lambda t, s, o, p: (
            (s / "model-00002-of-00003.safetensors").write_bytes(
                (s / "model-00002-of-00003.safetensors").read_bytes()[:300]
            ),
            [],
        )[1],
        1,
        "model-00002-of-00003.safetensors",
        "as before",
    ),
    Fault(
        "missing-shard",
        lambda t, s, o, p: ((s / "model-00003-of-00003.safetensors").unlink(), [])[1],
        1,
        "model-00003-of-00003.safetensors",
        "as before",
    ),
    Fault(
        "nan-in-quantized",
        lambda t, s, o, p: (corrupt(s, set_nan(w := "model.layers.1.mlp.experts.1.up_proj.weight"), w), [])[1],
        1,
        "model.layers.1.mlp.experts.1.up_proj.weight contains NaN",
        "as before",
    ),
    # item 10: no `architectures` in config.json: the family comes from `model_type` (a success, not a refusal)
    Fault(
        "config-without-architectures",
        lambda t, s, o, p: (without_architectures(s / "config.json"), [])[1],
        0,
        "",
        "complete",
    ),
    # item 4: no subcommand, a bad device
    Fault("no-subcommand", N, 2, "usage: moeq-triton", "as before", argv=lambda s, o: []),
    Fault("demo-bad-device", N, 2, "invalid choice: 'foo'", "as before", argv=lambda s, o: ["demo", "--device", "foo"]),
    # item 6: disk full while writing a shard, and while writing metadata
    Fault(
        "enospc-shard",
        lambda t, s, o, p: ["--out", str(full_disk(t / "small-disk") / "out")],
        1,
        ".safetensors: write failed (No space left on device)",
        "as before",
    ),
    Fault(
        "enospc-metadata",
        N,
        1,
        "config.json: write failed (No space left on device)",
        "as before",
        inject=to_dev_full("write_json", lambda f: f == "config.json"),
    ),
    # item 7: non-finite kept tensors
    Fault(
        "nan-in-kept",
        lambda t, s, o, p: (corrupt(s, set_nan(w := "model.embed_tokens.weight"), w), [])[1],
        1,
        "kept tensor model.embed_tokens.weight contains NaN or Inf; pass --allow-nonfinite-kept",
        "as before",
    ),
    Fault(
        "nan-in-kept-allowed",
        lambda t, s, o, p: (corrupt(s, set_nan(w := "model.embed_tokens.weight"), w), ["--allow-nonfinite-kept"])[1],
        0,
        "warning: kept tensor model.embed_tokens.weight contains NaN or Inf",
        "complete",
    ),
    # item 8: the fast CPU path cannot be built
    Fault("no-c-compiler", N, 0, "could not be compiled, no working C compiler", "complete", inject=no_c_compiler),
    # item 9: the memory figure separates the heap from mapped files
    Fault("memory-figure", N, 0, "MiB heap (anonymous: the batches in flight", "complete"),
    # item 5: real signals (subprocess): the message says what is on disk
    Fault("sigint-reading", N, 130, "is as it was before the run", "as before", signal_at="reading", marks=[SLOW]),
    Fault(
        "sigint-quantizing", N, 130, "is as it was before the run", "as before", signal_at="quantizing", marks=[SLOW]
    ),
    Fault(
        "sigint-writing",
        lambda t, s, o, p: (copy_prior(p, o), ["--overwrite"])[1],
        130,
        "is as it was before the run",
        "as before",
        signal_at="writing",
        marks=[SLOW],
    ),
    Fault(
        "sigint-verifying",
        lambda t, s, o, p: ["--verify"],
        130,
        "had been written completely, but it is not verified",
        "complete",
        signal_at="verifying",
        marks=[SLOW],
    ),
    Fault(
        "sigterm-writing",
        N,
        143,
        "terminated (SIGTERM) before the output was complete",
        "as before",
        signal_at="writing:TERM",
        marks=[SLOW],
    ),
    Fault(  # a signal once the output is complete ends nothing: exit 0, and it is said
        "sigint-committing",
        lambda t, s, o, p: (copy_prior(p, o), ["--overwrite"])[1],
        0,
        "SIGINT received after",
        "complete",
        signal_at="committing",
        marks=[SLOW],
    ),
    # a rank failing in a 2-process run; item 13: every collective on the device NCCL requires
    Fault(
        "rank-1-disk-full",
        N,
        1,
        "rank 1 failed while quantizing and writing shards",
        "as before",
        ranks="fail-rank-1",
        marks=[SLOW],
    ),
    Fault("two-ranks-nccl-rules", N, 0, "", "complete", ranks="nccl", marks=[SLOW]),
]


# ---------------------------------------------------------------- issue 23, items 3 to 5: one line, never silent


def qwen3_5_source(path: Path, edit: Callable[[dict], None] = lambda t: None, experts: int = 2) -> Path:
    """A tiny Qwen3.5-MoE as released: stacked ``experts.gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
    gen = torch.Generator().manual_seed(SEED)
    tensors = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=gen),
        "model.layers.0.mlp.gate.weight": torch.randn(experts, HIDDEN, generator=gen),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(experts, 2 * FFN, HIDDEN, generator=gen),
        "model.layers.0.mlp.experts.down_proj": torch.randn(experts, HIDDEN, FFN, generator=gen),
    }
    tensors = {n: t.to(torch.bfloat16) for n, t in tensors.items()}
    edit(tensors)
    path.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, path / "model.safetensors", {"format": "pt"})
    config = {"architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text", "num_experts": experts}
    (path / "config.json").write_text(json.dumps(config))
    return path


def replace_source(make: Callable[[Path], Path]) -> Callable:
    """A prepare step: the row's source replaced by ``make(src)``."""

    def prepare(t: Path, s: Path, o: Path, p: Path) -> list[str]:
        shutil.rmtree(s)
        make(s)
        return []

    return prepare


def _stacked_nan(tensors: dict) -> None:
    tensors["model.layers.0.mlp.experts.gate_up_proj"][1, 3, 5] = float("nan")


def _stacked_narrow(tensors: dict) -> None:
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = tensors["model.layers.0.mlp.experts.gate_up_proj"][..., :24]


def _stacked_odd(tensors: dict) -> None:
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = tensors["model.layers.0.mlp.experts.gate_up_proj"][:, :31]


def add_tensors(tensors: dict[str, torch.Tensor], index: bool = True) -> Callable:
    """A prepare step: ``tensors`` added to the first shard (and to the index unless ``index`` is False)."""

    def prepare(t: Path, s: Path, o: Path, p: Path) -> list[str]:
        first = "model-00001-of-00003.safetensors"
        shard = load_file(s / first)
        save_file({**shard, **tensors}, s / first, {"format": "pt"})
        if index:
            data = json.loads((s / INDEX).read_text())
            data["weight_map"] |= dict.fromkeys(tensors, first)
            (s / INDEX).write_text(json.dumps(data))
        return []

    return prepare


def edit_source(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable:
    """A prepare step: every tensor of the source through ``edit`` (which may add or drop), reshard as three."""

    def prepare(t: Path, s: Path, o: Path, p: Path) -> list[str]:
        tensors = {}
        for file in sorted(s.glob("*.safetensors")):
            tensors |= load_file(file)
            file.unlink()
        edit(tensors)
        names = sorted(tensors)
        weight_map = {}
        for i in range(3):
            file = f"model-{i + 1:05d}-of-00003.safetensors"
            save_file({n: tensors[n].contiguous() for n in names[i::3]}, s / file, {"format": "pt"})
            weight_map |= dict.fromkeys(names[i::3], file)
        (s / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return []

    return prepare


def set_config(**values) -> Callable:
    def prepare(t: Path, s: Path, o: Path, p: Path) -> list[str]:
        config = json.loads((s / "config.json").read_text())
        (s / "config.json").write_text(json.dumps(config | values))
        return []

    return prepare


EXPERT = "model.layers.1.mlp.experts.1"
ODD_DTYPES = {
    "model.layers.0.attention_mask_buffer": torch.ones(4, dtype=torch.bool),
    "model.layers.0.position_ids_i16": torch.arange(4, dtype=torch.int16),
    "model.layers.0.hash_u16": torch.arange(4).to(torch.uint16),
    "model.layers.0.hash_u32": torch.arange(4).to(torch.uint32),
    "model.layers.0.table_e5m2": torch.ones(4, dtype=torch.float8_e5m2),
    "model.layers.0.rope_f64": torch.ones(4, dtype=torch.float64),
}


def _drop(name: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.pop(name)


def _narrow_up(tensors: dict) -> None:
    tensors[f"{EXPERT}.up_proj.weight"] = tensors[f"{EXPERT}.up_proj.weight"][:8]


def _as_int16(tensors: dict) -> None:
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].to(
        torch.int16
    )


def _traversing_index(t: Path, s: Path, o: Path, p: Path) -> list[str]:
    data = json.loads((s / INDEX).read_text())
    data["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (s / INDEX).write_text(json.dumps(data))
    return []


ROWS_23 = [
    Fault("kept-dtypes-outside-the-quantized-set", add_tensors(ODD_DTYPES), 0, "", "complete"),
    Fault(
        "quantized-linear-of-int16",
        edit_source(_as_int16),
        1,
        "tensor model.layers.0.self_attn.q_proj.weight (I16, shape [32, 32]) cannot be quantized",
        "as before",
    ),
    Fault(
        "tensor-not-in-the-index",
        add_tensors({"model.layers.0.stray.weight": torch.ones(4, dtype=torch.bfloat16)}, index=False),
        0,
        "1 tensor(s) in the source's shards are not in its index and are not carried (loaders skip them too), "
        "e.g. model.layers.0.stray.weight (in model-00001-of-00003.safetensors)",
        "complete",
    ),
    Fault(
        "num-experts-disagrees",
        set_config(num_experts=4),
        1,
        "config.json: num_experts = 4, but model.layers.0.mlp.experts holds 2 experts",
        "as before",
    ),
    Fault(
        "gate-and-up-of-different-shapes",
        edit_source(_narrow_up),
        1,
        f"{EXPERT}.up_proj.weight has shape [8, 32] but {EXPERT}.gate_proj.weight has [16, 32]; the engines fuse",
        "as before",
    ),
    Fault(
        "expert-missing-up",
        edit_source(_drop(f"{EXPERT}.up_proj.weight")),
        1,
        f"expert {EXPERT.rsplit('.', 1)[0]}.1 has down_proj, gate_proj but no up_proj",
        "as before",
    ),
    Fault(
        "expert-missing-down",
        edit_source(_drop(f"{EXPERT}.down_proj.weight")),
        1,
        "has gate_proj, up_proj but no down_proj",
        "as before",
    ),
    Fault(
        "exclude-everything",
        lambda t, s, o, p: ["--exclude", "*"],
        1,
        "nothing to quantize: every linear of this Qwen3-MoE checkpoint is kept",
        "as before",
    ),
    Fault(
        "experts-only-without-experts",
        lambda t, s, o, p: ["--experts-only", "--exclude", "*.mlp.experts.*"],
        1,
        "nothing to quantize",
        "as before",
    ),
    Fault(
        "already-quantized-source",
        lambda t, s, o, p: ["--model", str(p)],
        1,
        "out/config.json: the source is already quantized (quantization_config quant_method 'modelopt')",
        "as before",
    ),
    Fault(
        "index-entry-outside-the-checkpoint",
        _traversing_index,
        1,
        "weight_map entry model.norm.weight -> '../elsewhere.safetensors' is not a file name in the checkpoint",
        "as before",
    ),
    Fault(
        "out-name-too-long",
        lambda t, s, o, p: ["--out", str(t / ("x" * 300))],
        1,
        "cannot write there (File name too long)",
        "as before",
    ),
    Fault(
        "model-path-too-long",
        lambda t, s, o, p: ["--model", str(s) + "/x" * 3000],
        1,
        "cannot read (File name too long)",
        "as before",
    ),
    Fault("out-empty", lambda t, s, o, p: ["--out", ""], 2, "--out: an empty path", "as before"),
    Fault("out-dot", lambda t, s, o, p: ["--out", "."], 1, "'.': not a directory name to write to", "as before"),
    Fault(
        "allow-nonfinite-kept-with-verify",
        lambda t, s, o, p: (
            corrupt(s, set_nan(w := "model.embed_tokens.weight"), w),
            ["--allow-nonfinite-kept", "--verify"],
        )[1],
        0,
        "verify: ",
        "complete",
    ),
    Fault(
        "fp8-block-shapes-the-engines-refuse",
        lambda t, s, o, p: ["--format", "fp8-block"],
        0,
        "warning: vLLM and SGLang refuse FP8 blocks at load when an expert's intermediate size",
        "complete",
    ),
    Fault(
        "qwen3_5-nan-in-stacked-experts",
        replace_source(lambda s: qwen3_5_source(s, _stacked_nan)),
        1,
        "model.safetensors (model.layers.0.mlp.experts.gate_up_proj[1]): tensor "
        "model.layers.0.mlp.experts.1.gate_proj.weight contains NaN or Inf",
        "as before",
    ),
    Fault(
        "qwen3_5-slice-not-quantizable",
        replace_source(lambda s: qwen3_5_source(s, _stacked_narrow)),
        1,
        "model.safetensors (model.layers.0.mlp.experts.gate_up_proj[0]): tensor "
        "model.layers.0.mlp.experts.0.gate_proj.weight (BF16, shape [16, 24]) cannot be quantized to nvfp4",
        "as before",
    ),
    Fault(
        "qwen3_5-gate-up-odd-rows",
        replace_source(lambda s: qwen3_5_source(s, _stacked_odd)),
        1,
        "model.layers.0.mlp.experts.gate_up_proj has 31 rows",
        "as before",
    ),
]
FAULTS += ROWS_23


# ---------------------------------------------------------------- running each fault


def run_inline(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.err + " ".join(captured.out.split())  # rich wraps stdout lines: unwrapped here


PHASE_HOOKS = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from moeq_triton import cli
    from moeq_triton.checkpoint import io as checkpoint_io
    from moeq_triton.checkpoint import job
    from moeq_triton.checkpoint import quantize as model_free
    from moeq_triton.checkpoint import shard_file

    # Ctrl-C as a terminal user has it: a parent started in the background (nohup, `&` without job control)
    # passes SIGINT down ignored, and an ignored SIGINT is rightly ignored by the command too
    signal.signal(signal.SIGINT, signal.default_int_handler)
    phase = sys.argv[1]

    def pause(*args, **kwargs):
        print(f"FAULT-POINT {phase}", file=sys.stderr, flush=True)
        time.sleep(60 if threading.current_thread() is threading.main_thread() else 3)

    def hook(holder, name):
        original = getattr(holder, name)

        def paused(*args, **kwargs):
            pause()
            setattr(holder, name, original)
            return original(*args, **kwargs)

        setattr(holder, name, paused)

    where = {"reading": (checkpoint_io.SourceCheckpoint, "tensor"), "quantizing": (job, "quantize_units"),
             "writing": (shard_file.ShardFile, "write"), "verifying": (model_free, "verify")}
    if phase == "committing":  # the process raises SIGINT itself, between the commit's two renames
        import pathlib

        original = pathlib.Path.rename

        def rename(self, target):
            result = original(self, target)
            if ".moeq-triton-old" in str(target):
                moved = f"{self.name} -> {pathlib.Path(target).name}"
                print(f"FAULT-POINT {phase}: after {moved}", file=sys.stderr, flush=True)
                signal.raise_signal(signal.SIGINT)
            return result

        pathlib.Path.rename = rename
    else:
        hook(*where[phase.split(":")[0]])
    sys.exit(cli.main(sys.argv[2:]))
    """
)


def run_with_signal(argv: list[str], phase: str) -> tuple[int, str]:
    """A real process; a real SIGINT/SIGTERM from here while it waits at ``phase``."""
    number = signal.SIGTERM if phase.endswith(":TERM") else signal.SIGINT
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", PHASE_HOOKS, phase, *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("FAULT-POINT"):
            if phase != "committing":  # there the process has raised it itself, at the exact point
                proc.send_signal(number)
            break
    rest = proc.communicate(timeout=120)[1]
    return proc.returncode, "".join(seen) + rest


def _rank_main(rank: int, world: int, argv: list[str], mode: str) -> tuple[int, str]:
    """One rank of a 2-process run: the command in-process, its exit code and stderr."""
    import contextlib
    import io

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), TRITON_INTERPRET="0")
    err = io.StringIO()
    context = contextlib.nullcontext()
    if mode == "fail-rank-1" and rank == 1:
        from moeq_triton.checkpoint import shard_file

        def disk_full(fd, data, offset):  # rank 1 alone fails, as its own full disk would
            raise shard_file.ShardWriteError(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

        shard_file.write_at = disk_full
    if mode == "nccl":
        from tests.pretend_nccl import pretend_nccl

        context = pretend_nccl()
    with context, contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, err.getvalue()


def run_two_ranks(argv: list[str], mode: str) -> tuple[int, str]:
    results = values(run_ranks(_rank_main, 2, argv, mode, timeout_s=240))
    codes = {code for code, _ in results}
    assert len(codes) == 1, results  # every rank ends the same way
    if mode == "fail-rank-1":
        assert "No space left on device" in results[1][1], results[1][1]
    return codes.pop(), results[0][1]


@pytest.mark.parametrize("fault", [pytest.param(f, id=f.id, marks=f.marks) for f in FAULTS])
def test_fault(fault: Fault, tiny, prior, tmp_path, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the command's own CPU path (the C loop), as users run it
    monkeypatch.setenv("FAULT_EMPTY_CACHE", str(tmp_path_factory.mktemp("empty-cache")))
    monkeypatch.setenv("FAULT_TMP", str(tmp_path))
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(tiny, src)
    argv = fault.argv(src, out) if fault.argv else defaults(src, out)
    argv += fault.prepare(tmp_path, src, out, prior)
    if fault.inject:
        fault.inject(monkeypatch)
    before = snapshot(tmp_path)
    try:
        if fault.signal_at:
            code, err = run_with_signal(argv, fault.signal_at)
        elif fault.ranks:
            code, err = run_two_ranks(argv, fault.ranks)
        else:
            code, err = run_inline(argv, capsys)
    finally:
        for holder in HOLDERS:
            holder.kill()
            holder.wait()
        HOLDERS.clear()
        for mount in MOUNTS:
            assert snapshot(mount) == {}, "the full disk keeps nothing"  # checked before it goes away
            subprocess.run(["umount", str(mount)], check=True)
        MOUNTS.clear()
        from moeq_triton.kernels import native

        native.library.cache_clear()  # no-c-compiler: the next run finds the real compiler again
    assert code == fault.code, err[-2000:]
    assert fault.says in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    if code not in (0, 2):
        assert len([line for line in err.splitlines() if line.startswith("moeq-triton:")]) >= 1
    if fault.after == "as before":
        assert snapshot(tmp_path) == before
    else:
        assert_complete(out)
        # partial directories of ours (they hold the mark), left by killed runs: discarded
        stale = tuple(k.split("/")[0] for k in before if k.endswith("/.moeq-triton-partial"))
        stale += (".out.moeq-triton-lock", ".out.moeq-triton-old")  # a killed run's lock file and old output
        expected = {k: v for k, v in before.items() if not k.startswith(("out/", *stale))}
        assert snapshot(tmp_path, skip=out) == expected | {"out": "dir"}


# ---------------------------------------------------------------- one run per destination (issue 23, item 1)


def command(argv: list[str], **kwargs) -> subprocess.Popen:
    """The command as users start it, in a real process."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.Popen([sys.executable, "-m", "moeq_triton", *argv], text=True, env=env, **kwargs)


@SLOW
def test_second_run_fails_at_once_naming_the_first(tiny, tmp_path):
    """Run A waits inside its first shard write (a real process); run B into the same --out fails at once in
    one line naming A's pid and touches nothing of A's; A, terminated, leaves everything as before."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(tiny, src)
    before = snapshot(tmp_path)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    first = subprocess.Popen(
        [sys.executable, "-c", PHASE_HOOKS, "writing", *defaults(src, out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert first.stderr.readline().startswith("FAULT-POINT"), "run A never reached its first shard"
        partial = [p for p in os.listdir(tmp_path) if p.startswith(".out.moeq-triton-partial-")]
        assert partial and partial[0].startswith(f".out.moeq-triton-partial-{first.pid}-"), partial
        during = snapshot(tmp_path)
        second = command([*defaults(src, out), "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = second.communicate(timeout=120)[1]
        assert second.returncode == 1, err
        assert f"out: another moeq-triton run (pid {first.pid}) is writing it" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert snapshot(tmp_path) == during  # A's partial and lock untouched
        first.send_signal(signal.SIGTERM)
        rest = first.communicate(timeout=120)[1]
        assert first.returncode == 143, rest
    finally:
        first.kill()
    assert snapshot(tmp_path) == before


@SLOW
@pytest.mark.parametrize("formats", [("nvfp4", "fp8-block"), ("fp8", "nvfp4"), ("fp8-per-channel", "fp8")])
def test_racing_runs_leave_one_complete_output(formats, tiny, tmp_path):
    """Two runs started together into one --out (the issue's reproduction): exactly one succeeds, the other
    fails in one line (the lock, or the finished destination), and the output is the winner's, complete."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(tiny, src)
    runs = [
        command([*defaults(src, out), "--format", f], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for f in formats
    ]
    errs = [r.communicate(timeout=240)[1] for r in runs]
    codes = [r.returncode for r in runs]
    assert sorted(codes) == [0, 1], (codes, errs)
    winner, loser = codes.index(0), codes.index(1)
    assert "another moeq-triton run (pid" in errs[loser] or "exists and is not empty" in errs[loser], errs[loser]
    assert "Traceback" not in errs[loser] + errs[winner]
    checkpoint = SourceCheckpoint(out)
    for name in checkpoint.names():
        checkpoint.tensor(name)
    assert sorted(manifest(out)["files"]) == sorted(os.listdir(out))
    algo = {"nvfp4": "W4A16_NVFP4", "fp8": "FP8", "fp8-per-channel": "FP8_PER_CHANNEL_PER_TOKEN"}
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config.get("quant_algo", "FP8_BLOCK_SCALES") == algo.get(formats[winner], "FP8_BLOCK_SCALES")
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no partial, no lock file left


@SLOW
def test_first_runs_share_the_default_checkpoint(tmp_path):
    """Two first runs without --model at once: one generates the cached checkpoint, the other waits for it
    (no SafetensorError, no leftovers in the cache)."""
    env = {**os.environ, "MOEQ_TRITON_CACHE": str(tmp_path / "cache")}
    code = "from moeq_triton.synthetic import default_checkpoint; print(default_checkpoint())"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [r.communicate(timeout=240) for r in runs]
    assert [r.returncode for r in runs] == [0, 0, 0], outs
    assert len({o.strip() for o, _ in outs}) == 1
    path = Path(outs[0][0].strip())
    checkpoint = SourceCheckpoint(path)
    assert len(checkpoint.names()) > 100 and checkpoint.tensor("lm_head.weight").dtype == torch.bfloat16
    assert sorted(os.listdir(tmp_path / "cache")) == [path.name]


# ---------------------------------------------------------------- all-zero weights (issue 23, item 2)

ZEROED = ("model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.0.mlp.experts.1.up_proj.weight")
ZEROED_ALONE = "model.layers.1.self_attn.o_proj.weight"  # not in a scale group of its own under any format


def zero(*names: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        for name in names:
            if name in tensors:
                tensors[name].zero_()

    return edit


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "fp8-per-channel", "fp8-block"])
def test_all_zero_weights_dequantize_to_exact_zeros(fmt, tiny, tmp_path, capsys, monkeypatch):
    """A pruned expert (gate and up all zero) and an all-zero o_proj: no NaN/Inf in any output tensor, the
    zero tensors decode to exact zeros, the table counts them, and --verify and inspect accept the result."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(tiny, src)
    for name in (*ZEROED, ZEROED_ALONE):
        corrupt(src, zero(name), name)
    code, err = run_inline([*defaults(src, out), "--format", fmt, "--verify"], capsys)
    assert code == 0, err
    assert "verify failed" not in err and "verify: " in err, err
    row = re.search(r"│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│", err)
    assert row and int(row.group(2)) == 3, err  # quantized, all-zero, kept
    result = SourceCheckpoint(out)
    for name in result.names():
        tensor = result.tensor(name)
        if tensor.dtype == torch.float8_e4m3fn:
            assert not bool(((tensor.view(torch.uint8) & 0x7F) == 0x7F).any()), name
        elif tensor.is_floating_point():
            assert bool(tensor.isfinite().all()), name
    for name in (*ZEROED, ZEROED_ALONE):
        codes = result.tensor(name).view(torch.uint8)
        assert not bool(codes.any()), name  # E2M1 / E4M3 code 0 is +0, whatever the scales
        scales = [n for n in result.names() if n.startswith(name + "_scale") or n.startswith(name[:-6] + "weight_sc")]
        for scale in scales:
            value = result.tensor(scale).float()
            assert bool((value == 1.0).all()), (scale, value)  # finite, non-zero: nothing an engine divides by
    if fmt == "nvfp4":  # the other expert of the layer keeps ModelOpt's bytes: only all-zero groups differ
        assert result.tensor("model.layers.0.mlp.experts.0.gate_proj.weight_scale_2").item() != 1.0
    assert cli.main(["inspect", str(out), "--device", "cpu"]) == 0  # (the tiny config.json declares no experts)
    assert "no problem found" in capsys.readouterr().out


def test_fp8_block_all_zero_count_is_exact_where_every_block_scale_is_one(monkeypatch):
    """fp8-block's all-zero count looks at the codes only where every block scale is 1.0 (what amax 0 gives):
    a weight whose every 128x128 block has amax exactly 448 (scale 1.0 too, codes non-zero) is not counted, a
    zero one and a -0.0 one are, an ordinary one is not."""
    from moeq_triton.checkpoint.formats import FORMATS
    from moeq_triton.checkpoint.job import Unit, quantize_units

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    at_448 = torch.zeros(256, 256, dtype=torch.bfloat16)
    at_448[::128, ::128] = 448.0
    loaded = {
        "zero.weight": torch.zeros(128, 256, dtype=torch.bfloat16),
        "negative_zero.weight": torch.full((128, 128), -0.0, dtype=torch.bfloat16),
        "at_448.weight": at_448,
        "ordinary.weight": torch.linspace(-1, 1, 128 * 128).reshape(128, 128).to(torch.bfloat16),
    }
    units = [Unit(names=[name], quantize=True, in_bytes=0, out_bytes=0) for name in loaded]
    zero: list[str] = []
    out = quantize_units(units, loaded, FORMATS["fp8-block"], None, all_zero=zero)
    assert bool((out["at_448.weight_scale_inv"] == 1).all())  # the case the scales alone cannot tell
    assert zero == ["zero.weight", "negative_zero.weight"]


# ---------------------------------------------------------------- the fuzz (issue 23, item 5), slow tier

FUZZ_SIGNALS, FUZZ_CORRUPTIONS = 50, 20


def blocked_start() -> None:
    """preexec_fn: SIGINT/SIGTERM blocked across exec, as a supervisor can start a process; the command
    unblocks them first thing (moeq_triton/__main__.py), so a signal sent during Python's own start-up, before
    any line of the command can run, reaches the command's handler instead of Python's default."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def fuzz_run(argv: list[str], delay: float | None, number: int) -> tuple[int, str]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeq_triton", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=env, preexec_fn=blocked_start,
    )  # fmt: skip
    if delay is not None:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(number)
    err = proc.communicate(timeout=300)[1]
    return (128 - proc.returncode if proc.returncode < 0 else proc.returncode), err


def corrupt_randomly(src: Path, rng) -> str:
    """One random corruption of a shard, the index or config.json; returns what was done (for the report)."""
    kind = rng.choice(["shard-truncate", "shard-header", "shard-data", "index-text", "index-entry", "config-text",
                       "config-value"])  # fmt: skip
    shards = sorted(src.glob("*.safetensors"))
    if kind.startswith("shard"):
        file = rng.choice(shards)
        data = bytearray(file.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        if kind == "shard-truncate":
            data = data[: rng.randrange(len(data))]
        else:
            at = rng.randrange(0, header) if kind == "shard-header" else rng.randrange(header, len(data))
            for i in range(at, min(at + rng.randint(1, 4), len(data))):
                data[i] = rng.randrange(256)
        file.write_bytes(bytes(data))
        return f"{kind} {file.name}"
    file = src / (INDEX if kind.startswith("index") else "config.json")
    text = file.read_text()
    if kind.endswith("text"):
        file.write_text(text[: rng.randrange(len(text))] if rng.random() < 0.5 else text.replace('"', "'", 1))
        return kind
    data = json.loads(text)
    if kind == "index-entry":
        name = rng.choice(sorted(data["weight_map"]))
        data["weight_map"][name] = rng.choice([shards[0].name, "missing.safetensors", "../x.safetensors", 3, None])
    else:
        key = rng.choice(["architectures", "num_experts", "hidden_size", "model_type"])
        data[key] = rng.choice([None, "x", -1, 7, ["Nope"], {}])
    file.write_text(json.dumps(data))
    return f"{kind}"


def check_fuzz_trial(label: str, code: int, err: str, root: Path, before: dict, src_before: dict) -> str:
    """The guarantees after any run: the source unchanged, the destination complete or exactly as before,
    nothing else left, an expected exit code, at most one line of error and no traceback."""
    out, src = root / "out", root / "src"
    assert code in (0, 1, 2, 130, 143), (label, code, err[-2000:])
    assert "Traceback" not in err, (label, err[-3000:])
    said = [line for line in err.splitlines() if line.startswith("moeq-triton:") and "warning" not in line]
    said = [line for line in said if not line.startswith("moeq-triton: note:")]
    assert len(said) <= 1, (label, err[-2000:])
    assert snapshot(src) == src_before, label
    assert sorted(os.listdir(root)) == sorted({"src", *(["out"] if out.exists() else [])}), (label, os.listdir(root))
    if code == 0:  # complete; over a prior output of the same source the bytes may equal what was there
        assert_complete(out)
        return "complete"
    if snapshot(root) == before:
        return "as before"
    assert code in (0, 130, 143), (label, code, err[-2000:])
    assert_complete(out)
    return "complete"


@SLOW
def test_fuzz_signals_and_corruptions(tiny, tmp_path):
    """>= 50 SIGINT/SIGTERM at random times over whole runs (start-up and exit included, with and without
    --verify or a prior output to --overwrite) and >= 20 random corruptions of shards, index and config.
    Two trials run at a time (2 cores). The run's seed (tests/seeds.py) unless FUZZ_SEED picks another; it is
    printed."""
    import random
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tests.seeds import SEED

    seed = int(os.environ.get("FUZZ_SEED", SEED))
    print(f"fuzz seed {seed} (FUZZ_SEED={seed} to rerun)")
    master = random.Random(seed)
    prior = tmp_path / "prior"
    started = time.perf_counter()
    code, err = fuzz_run([*defaults(tiny, prior)], None, 0)
    duration = time.perf_counter() - started
    assert code == 0, err
    print(f"one undisturbed run: {duration:.2f} s")

    def trial(i: int, trial_seed: int) -> str:
        rng = random.Random(trial_seed)
        root = tmp_path / f"t{i}"
        root.mkdir()
        shutil.copytree(tiny, root / "src")
        argv = defaults(root / "src", root / "out")
        if rng.random() < 0.4:
            shutil.copytree(prior, root / "out")
            argv.append("--overwrite")
        if rng.random() < 0.3:
            argv.append("--verify")
        if i < FUZZ_SIGNALS:
            what = f"signal {i} seed {trial_seed}"
            delay = rng.uniform(0, 1.3 * duration)
            number = rng.choice([signal.SIGINT, signal.SIGTERM])
            what += f" {signal.Signals(number).name} at {delay:.2f} s"
        else:
            what = f"corruption {i} seed {trial_seed}: " + corrupt_randomly(root / "src", rng)
            delay, number = None, 0
        before, src_before = snapshot(root), snapshot(root / "src")
        code, err = fuzz_run(argv, delay, number)
        outcome = check_fuzz_trial(what, code, err, root, before, src_before)
        shutil.rmtree(root)
        return f"{what}: exit {code}, {outcome}"

    seeds = [master.randrange(2**32) for _ in range(FUZZ_SIGNALS + FUZZ_CORRUPTIONS)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(trial, range(len(seeds)), seeds))
    print("\n".join(results))
    codes = [r.split("exit ")[1].split(",")[0] for r in results[:FUZZ_SIGNALS]]
    assert {"130", "143"} <= set(codes), codes  # the signals did land inside runs


def test_old_output_comes_back_when_a_run_died_between_the_renames(prior, tmp_path):
    """A run killed after moving the previous output aside and before moving the new one in: the next run
    (holding the lock) puts the previous output back before anything else; aborting leaves just that."""
    shutil.copytree(prior, tmp_path / ".out.moeq-triton-old-4242-0badf00d")
    out = AtomicCheckpointDir(tmp_path / "out", overwrite=True)
    out.create()
    assert snapshot(tmp_path / "out") == snapshot(prior)
    out.abort()
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("value", [7, -1, {"a": 1}, ["Qwen3MoeForCausalLM", 3], 2.5])
def test_config_architectures_of_the_wrong_type_is_one_line(value):
    """Found by the fuzz (a config.json value replaced): `architectures` that is not a list of names is named."""
    from moeq_triton.naming import UnsupportedArchitecture, family_for

    with pytest.raises(UnsupportedArchitecture, match=r"config\.json: architectures is .*expected a list"):
        family_for({"architectures": value, "model_type": "qwen3_moe"})


@pytest.mark.parametrize("value", ["x", ["Nope"], {}, None, -1, 2.0])
def test_an_expert_count_that_is_not_an_integer_is_no_moe(value):
    from moeq_triton.checkpoint.serving import is_moe

    assert not is_moe({"num_experts": value})
    assert is_moe({"num_experts": value, "n_routed_experts": 8})

"""``--model org/name`` (issue 26 item 4), with no network: a Hub cache laid out as huggingface_hub lays it
out (blobs, snapshots/<commit> symlinks, refs/main) in tmp_path, ``HF_HUB_OFFLINE=1`` or an unreachable
endpoint, the command in a fresh process so that huggingface_hub reads the environment as a user's would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save

from moeq_triton import cli
from moeq_triton.checkpoint import hub
from moeq_triton.checkpoint.io import INDEX
from tests.assertions import assert_bitwise_equal, checkpoint_tensors

REPO, COMMIT = "tiny-org/tiny-qwen3-moe", "0123456789abcdef0123456789abcdef01234567"
HIDDEN, FFN = 32, 16


def source_files() -> dict[str, bytes]:
    """A one-layer, two-expert Qwen3-MoE checkpoint in two shards with an index (seeded), plus a tokenizer file."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (64, HIDDEN), "lm_head.weight": (64, HIDDEN), "model.norm.weight": (HIDDEN,)}
    shapes |= {f"model.layers.0.self_attn.{n}_proj.weight": (HIDDEN, HIDDEN) for n in "qkvo"}
    shapes["model.layers.0.mlp.gate.weight"] = (2, HIDDEN)
    for e in range(2):
        shapes |= {f"model.layers.0.mlp.experts.{e}.{n}_proj.weight": (FFN, HIDDEN) for n in ("gate", "up")}
        shapes[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = (HIDDEN, FFN)
    tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in sorted(shapes.items())}
    files, weight_map, names = {}, {}, sorted(tensors)
    for i in range(2):
        file, part = f"model-{i + 1:05d}-of-00002.safetensors", names[i::2]
        files[file] = save({n: tensors[n] for n in part}, {"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    files[INDEX] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["config.json"] = json.dumps({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}).encode()
    files["tokenizer.json"] = b"{}"
    return files


def hub_cache(root: Path, files: dict[str, bytes]) -> Path:
    """``root`` as huggingface_hub's cache holds REPO at COMMIT, main pointing at it; returns the snapshot."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def run(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    environment |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "moeq_triton", "quantize", "--device", "cpu", *argv],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment,
    )  # fmt: skip


@pytest.mark.slow  # two fresh processes and a quantization in this one
def test_a_cached_hub_id_quantizes_offline_as_its_local_snapshot_does(tmp_path):
    snapshot = hub_cache(tmp_path / "cache", source_files())
    cache = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = run(tmp_path, "--model", REPO, **cache)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "tiny-qwen3-moe-nvfp4"  # named after the repository, not the snapshot's commit
    assert cli.main(["quantize", "--model", str(snapshot), "--out", str(tmp_path / "local"), "--device", "cpu"]) == 0
    ours, local = checkpoint_tensors(out), checkpoint_tensors(tmp_path / "local")
    assert ours.keys() == local.keys() and ours
    for name in ours:
        assert_bitwise_equal(ours[name], local[name], name)
    assert (out / "tokenizer.json").read_text() == "{}"
    pinned = run(tmp_path, "--model", REPO, "--revision", COMMIT, "--out", "pinned", **cache)
    assert pinned.returncode == 0, pinned.stderr[-3000:]


def test_an_uncached_hub_id_offline_fails_in_one_line(tmp_path):
    hub_cache(tmp_path / "cache", source_files())
    done = run(tmp_path, "--model", "tiny-org/not-cached", HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith("moeq-triton: error: --model tiny-org/not-cached: not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in lines[0] and not any(tmp_path.glob("not-cached*"))


@pytest.mark.slow  # huggingface_hub retries a refused connection before it gives up
def test_no_network_fails_in_one_line(tmp_path):
    """The Hub unreachable (a closed local port as the endpoint), the id not cached: one line, exit 1."""
    done = run(tmp_path, "--model", REPO, HF_HUB_CACHE=str(tmp_path / "cache"), HF_ENDPOINT="http://127.0.0.1:9")
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and "the Hub could not be reached" in done.stderr, done.stderr[-3000:]


def test_revision_without_a_hub_id_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["quantize", "--model", str(tmp_path), "--revision", "main", "--device", "cpu"]) == 2
    assert "--revision needs --model to be a Hub id" in capsys.readouterr().err


def test_only_what_the_command_reads_is_fetched(tmp_path):
    """The first step's patterns (as huggingface_hub applies them) take config, index and tokenizer files,
    never pickled weights or safetensors; the second takes exactly the shards the index names."""
    from huggingface_hub.utils import filter_repo_objects

    repo_files = [
        "config.json", INDEX, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "consolidated.safetensors", "pytorch_model.bin", "original/consolidated.00.pth", "tokenizer.json",
        "tokenizer_config.json", "generation_config.json", "README.md", ".gitattributes", "original/params.json",
    ]  # fmt: skip
    first = set(filter_repo_objects(repo_files, allow_patterns=list(hub.METADATA_FILES)))
    assert first == {"config.json", INDEX, "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    snapshot = hub_cache(tmp_path, source_files())
    assert hub.shard_files(snapshot) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (tmp_path / "single").mkdir()
    assert hub.shard_files(tmp_path / "single") == ["model.safetensors"]


def test_gated_and_missing_repositories_are_one_line(monkeypatch, capsys):
    """What huggingface_hub raises for a gated or an unknown repository becomes one line naming the fix."""
    import huggingface_hub
    from huggingface_hub import utils as hub_utils

    for error, says in (
        (hub_utils.GatedRepoError, "gated; accept its terms on https://huggingface.co/org/gated and set HF_TOKEN"),
        (hub_utils.RepositoryNotFoundError, "no such repository on the Hugging Face Hub"),
    ):

        def refuse(*args, error=error, **kwargs):  # what the library raises, with the response it carries
            raise error("refused", response=SimpleNamespace(headers={}, request=None, status_code=403))

        monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
        assert cli.main(["quantize", "--model", "org/gated", "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err


def test_a_local_directory_wins_over_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not hub.is_hub_id("org/name") and hub.is_hub_id("org/other") and not hub.is_hub_id("a/b/c")

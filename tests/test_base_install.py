"""The base install (no extras): the kernels and the command run without ModelOpt, Megatron or transformers.

A subprocess hides every installed package outside the base install's dependency closure (what a fresh
``pip install moeq-triton`` sees), then quantizes and inspects the default SYNTHETIC checkpoint, whose
layout (written without transformers) is checked against transformers' own ``save_pretrained``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from safetensors import safe_open

from moeq_triton import synthetic
from moeq_triton.kernels import native

EXTRAS = ("modelopt", "megatron", "transformers")

BASE_INSTALL = """
import importlib.abc, sys

BLOCKED = {blocked!r}


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{fullname!r}} (blocked by the test)", name=fullname)
        return None


sys.meta_path.insert(0, NotInstalled())
import moeq_triton
import moeq_triton.kernels
from moeq_triton.cli import main

out = sys.argv[1]
print("QUANTIZE", main(["quantize", "--out", out, "--device", "cpu", "--verify"]), flush=True)
print("INSPECT", main(["inspect", out, "--device", "cpu"]), flush=True)
for name in ("NVFP4_WEIGHT_ONLY_CFG", "register"):
    try:
        value = getattr(moeq_triton, name)
        if callable(value):
            value()
        print("NO ERROR", name)
    except ImportError as error:
        print("MISSING", name, type(error).__name__, error)
print("LOADED", sorted({{m.split(".")[0] for m in sys.modules}} & BLOCKED))
"""


def base_distributions() -> set[str]:
    """moeq-triton's requirements without extras, closed over their own requirements (and the extras
    they ask for, e.g. ``safetensors[torch]``), as canonical distribution names."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [("moeq-triton", ())]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement whose marker holds here but that is not installed: nothing loads it
        for text in requirements:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((req.name, tuple(sorted(req.extras))))
    return {name for name, _ in seen}


def not_in_base_install() -> set[str]:
    """Top-level modules of the installed distributions a base install would not have."""
    allowed = base_distributions()
    distributions_of = importlib.metadata.packages_distributions()
    blocked = {m for m, dists in distributions_of.items() if not {canonicalize_name(d) for d in dists} & allowed}
    blocked -= {"moeq_triton", "kernels", "tests", "benchmarks"}  # this project (editable: no mapping)
    assert set(EXTRAS) <= blocked, set(EXTRAS) - blocked
    return blocked


def test_command_and_kernels_without_the_extras(tmp_path):
    """A module of the command's path that imports ModelOpt, Megatron or transformers (even lazily, on
    the default checkpoint, the quantization, --verify or inspect) fails here, and so does one that needs
    any package the base install does not declare (every other installed distribution is hidden too:
    safetensors.torch.save_file needs numpy, which neither torch nor safetensors declares); so does a ready
    config that does not name the missing extra."""
    cache = tmp_path / "cache"  # the default checkpoint is generated here; the compiled C loop is shared
    cache.mkdir()
    shared = native.cache_dir() / "native"
    shared.mkdir(parents=True, exist_ok=True)
    (cache / "native").symlink_to(shared, target_is_directory=True)
    env = {**os.environ, "MOEQ_TRITON_CACHE": str(cache), "TRITON_INTERPRET": "0"}
    run = subprocess.run(
        [sys.executable, "-c", BASE_INSTALL.format(blocked=not_in_base_install()), str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "QUANTIZE 0" in lines and "INSPECT 0" in lines, run.stdout[-3000:] + run.stderr[-3000:]
    assert "SYNTHETIC" in run.stdout and "verify:" in run.stdout
    for name in ("NVFP4_WEIGHT_ONLY_CFG", "register"):
        line = next(line for line in lines if line.endswith(name) or f" {name} " in line)
        assert line.startswith(f"MISSING {name} MissingExtraError"), line
        assert "pip install 'moeq-triton[modelopt]'" in line, line
    assert "LOADED []" in lines, lines[-1]


def test_default_checkpoint_layout_is_what_transformers_saves(tmp_path):
    """The default checkpoint is written without transformers (``qwen3_moe_layout``/``qwen3_moe_config``);
    a wrong name, shape or config key (a checkpoint transformers would not load as it saves it) must not
    survive.  The default shape with fewer layers, experts and vocabulary (the rules are per layer/expert)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = {**synthetic.SHAPE, "num_hidden_layers": 2, "num_experts": 4, "vocab_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(synthetic.qwen3_moe_config(shape)))
    config = Qwen3MoeConfig.from_pretrained(tmp_path)
    for key, value in shape.items():
        assert getattr(config, "num_local_experts" if key == "num_experts" else key) == value, key
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "reference")
    with safe_open(tmp_path / "reference" / "model.safetensors", "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    ours = synthetic.qwen3_moe_layout(shape)
    assert ours == saved, sorted(set(ours) ^ set(saved))[:10]
    reference_config = json.loads((tmp_path / "reference" / "config.json").read_text())
    assert reference_config["architectures"] == synthetic.qwen3_moe_config(shape)["architectures"]


def test_default_checkpoint_is_generated_once(tmp_path, monkeypatch):
    """Every tensor of ``qwen3_moe_layout`` written in bf16 (norms at 1), then the cached copy reused."""
    monkeypatch.setenv("MOEQ_TRITON_CACHE", str(tmp_path))
    path = synthetic.default_checkpoint()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert synthetic.default_checkpoint() == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    with safe_open(path / "model.safetensors", "pt") as f:
        assert {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()} == synthetic.qwen3_moe_layout(synthetic.SHAPE)
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
        assert torch.equal(f.get_tensor("model.norm.weight"), torch.ones(256, dtype=torch.bfloat16))
    assert not list(tmp_path.glob(".*partial"))

"""The repository as a checkout: it documents itself and shadows no one's import name.

- No tracked file points outside the repository (the team's notes folder is not in a clone; docs/ holds
  what the code relies on).
- Nothing at the repository root is importable under a name an installed distribution ships, or one our
  dependencies are known to bring: with the root on ``sys.path`` (pytest, ``python -m ...`` from the root)
  it would shadow that module. transformers >= 5.25 imports the PyPI package ``kernels``; a top-level
  ``kernels/`` here once broke every transformers model built from the root.
- A transformers model builds with the root first on ``sys.path`` (where transformers imports ``kernels``, from
  site-packages), and ``moeq_triton.kernels`` imports from a bare checkout without any install.
"""

from __future__ import annotations

import importlib.metadata
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = "moeq-triton"

# Pieces joined so that this file does not match its own pattern.
OUTSIDE = re.compile(r"\.\./" + "shared" + r"\b|\b" + "shared" + r"/(?:reference|tools|design\.md|style\.md|hooks)\b")

KNOWN_NAMES = {
    "kernels": "transformers >= 5.25 depends on PyPI's kernels (Hugging Face's kernel hub) and imports it",
}
"""Top-level module names of packages our dependencies bring in some release, whether installed here or not
(the pinned tier has transformers 5.24, which does not pull ``kernels``)."""


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [p for p in listed.stdout.split("\0") if p and (ROOT / p).is_file()]


def test_no_tracked_file_points_outside_the_repository():
    hits = []
    for path in tracked_files():
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert not hits, "files that point outside the repository (write what they rely on into docs/):\n" + "\n".join(hits)


def test_the_outside_pattern_catches_what_it_must():
    """The check above can fail: the spellings it exists for match, a plain word does not."""
    for text in ("see ../" + "shared" + "/tools/x.py", "shared" + "/reference/numerics.md", "shared" + "/design.md"):
        assert OUTSIDE.search(text), text
    for text in ("shared/dense experts", "shared_amax.py", "docs/numerics.md"):
        assert not OUTSIDE.search(text), text


def root_import_names() -> set[str]:
    """Modules and regular packages a ``sys.path`` entry at the root provides (a folder without
    ``__init__.py`` is only a namespace portion: it never shadows a regular package)."""
    return {m.name for m in pkgutil.iter_modules([str(ROOT)])}


def installed_top_level_names() -> dict[str, list[str]]:
    """Top-level module name -> the installed distributions (other than ours) that ship it."""
    shipped = importlib.metadata.packages_distributions()
    return {name: dists for name, dists in shipped.items() if set(dists) - {OURS}}


def test_nothing_at_the_root_shadows_an_installed_or_known_module():
    names = root_import_names()
    assert "moeq_triton" in names  # the scan sees the root at all
    shipped = installed_top_level_names()
    assert "torch" in shipped and "triton" in shipped  # and the installed side too
    clashes = {n: shipped[n] for n in names if n in shipped}
    clashes |= {n: KNOWN_NAMES[n] for n in names if n in KNOWN_NAMES}
    assert not clashes, f"importable at the repository root under a name others ship: {clashes}"


def _transformers_requires_kernels() -> bool:
    try:
        requirements = importlib.metadata.requires("transformers") or []
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(re.match(r"kernels\b", r) and ";" not in r for r in requirements)


def test_transformers_model_builds_from_the_repository_root():
    """In this process, where pytest has put the root on ``sys.path`` ahead of site-packages (the tests are a
    package), as ``python -m ...`` or ``python -c`` in the root would. Where transformers depends on ``kernels``
    (>= 5.25, the newest-release job), building the model must have imported it, from site-packages."""
    transformers = pytest.importorskip("transformers")  # the [hf] extra; `make test` and the newest job install it
    entries = [Path(p or ".").resolve() for p in sys.path]
    site = Path(transformers.__file__).resolve().parent.parent
    assert ROOT in entries and entries.index(ROOT) < entries.index(site), "the root is not ahead of site-packages"
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    Qwen3MoeForCausalLM(config)
    kernels = sys.modules.get("kernels")
    if _transformers_requires_kernels():
        assert kernels is not None, "transformers requires kernels but building a model did not import it"
    if kernels is not None:
        assert "site-packages" in Path(kernels.__file__).parts, f"kernels imported from {kernels.__file__}"


def test_kernels_import_from_a_bare_checkout(tmp_path):
    """``python -c "import moeq_triton.kernels"`` in a copy of the tracked files, with torch and triton on the
    path but no site processing, so no editable install of ours can answer."""
    for path in tracked_files():
        if path.startswith("moeq_triton/"):
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, tmp_path / path)
    import torch
    import triton

    paths = {str(Path(m.__file__).resolve().parent.parent) for m in (torch, triton)}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = os.pathsep.join(sorted(paths))
    code = "import moeq_triton.kernels as k, sys; print(k.__file__); assert 'site' not in sys.modules"
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()).resolve().is_relative_to(tmp_path.resolve()), done.stdout

"""The README's layout section is the tree: every module of moeq_triton/, benchmarks/ and tests/
named there, and nothing named there that is gone.

``__init__.py`` files are the only ones not required by name.  The tree is git's view (tracked files plus
untracked ones that are not ignored), so a new module fails here until the README lists it.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("moeq_triton", "benchmarks", "tests")
FILE = re.compile(r"[\w*]+\.(?:py|c|sh|md)\b")


def layout_names(readme: str) -> dict[str, set[str]]:
    """Directory (as 'moeq_triton/naming') -> the file names or globs the layout block names in it."""
    block = readme.split("## Layout\n", 1)[1].split("```\n", 2)[1]
    names: dict[str, set[str]] = {}
    top = sub = None
    for line in block.splitlines():
        head = re.match(r"(\s*)(\w+)/(?:\s|$)", line)
        if head and not head.group(1):
            top, sub = head.group(2), None
        elif head:
            sub = head.group(2)
        elif line and not line[0].isspace():
            top = sub = None
        elif re.match(r"  \S", line):
            sub = None  # a file line of the top directory ends a sub-directory's entry
        if top is None:
            continue
        directory = f"{top}/{sub}" if sub else top
        names.setdefault(directory, set()).update(FILE.findall(line))
    return names


def tree() -> dict[str, set[str]]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *TOP],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    files: dict[str, set[str]] = {}
    for path in listed:
        if (ROOT / path).is_file() and FILE.fullmatch(Path(path).name):
            files.setdefault(str(Path(path).parent), set()).add(Path(path).name)
    return files


def test_layout_section_matches_the_tree():
    named, present = layout_names((ROOT / "README.md").read_text()), tree()
    assert set(present) <= set(named), f"directories missing from the README layout: {set(present) - set(named)}"
    unlisted = {d: sorted(f for f in files - {"__init__.py"} if not any(fnmatch.fnmatch(f, n) for n in named[d]))
                for d, files in present.items()}  # fmt: skip
    stale = {d: sorted(n for n in names if not any(fnmatch.fnmatch(f, n) for f in present.get(d, ())))
             for d, names in named.items()}  # fmt: skip
    assert not any(unlisted.values()), f"modules the README layout does not list: {unlisted}"
    assert not any(stale.values()), f"the README layout names files that are not in the tree: {stale}"


def test_layout_parser_sees_every_directory_and_a_missing_module():
    """The check above must not pass by parsing nothing: the README's block yields every directory with
    its files, and a module left out of a made-up layout is reported."""
    named = layout_names((ROOT / "README.md").read_text())
    subpackages = {"moeq_triton/" + d for d in ("kernels", "naming", "checkpoint", "modelopt", "export")}
    assert set(named) == {*TOP, *subpackages, *("tests/" + d for d in ("kernels", "checkpoint", "modelopt", "export"))}
    assert {"hf.py", "rules.py", "megatron.py"} <= named["moeq_triton/naming"]
    assert "cli.py" in named["moeq_triton"] and "hf.py" not in named["moeq_triton"]
    assert "test_*.py" in named["tests"] and "RESULTS.md" in named["benchmarks"]
    made_up = "## Layout\n\n```\nbenchmarks/   x\n  run.py   y\nmoeq_triton/  z\n  naming/  hf.py\n  cli.py\n```\n"
    assert layout_names(made_up) == {
        "benchmarks": {"run.py"},
        "moeq_triton": {"cli.py"},
        "moeq_triton/naming": {"hf.py"},
    }

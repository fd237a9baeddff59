"""The README's promise: every touch of a ModelOpt private lives in ``moeq_triton/modelopt/patches.py``.

Read from the source (AST), so the rule holds for code paths no other test reaches.  Outside
patches.py no module may read or write an underscore attribute of an object it does not own, pass an
underscore attribute name to getattr/hasattr/setattr, import an underscore name from ModelOpt, or name
the ModelOpt internals whose steps we replay.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "moeq_triton"
PATCHES = PACKAGE / "modelopt" / "patches.py"
NOT_MODELOPT = {"_base", "_fields", "_exit"}  # Tensor._base, namedtuple field names, os._exit (public, stdlib)
# ModelOpt internals replayed by the whole-model path: only patches.py may name them
INTERNALS = {"layer_sync_moe_local_experts_amax", "SharedWeightGlobalAmaxState", "SharedQuantState", "_calib_amax"}
ATTRIBUTE_CALLS = {"getattr", "hasattr", "setattr", "delattr", "register_buffer"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_names(tree: ast.AST) -> set[str]:
    """Underscore names this module defines itself: methods, functions, classes and ``self._x = ...``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)  # dataclass fields
    return names


def violations(source: str, path: str) -> list[str]:
    tree = ast.parse(source)
    own = _own_names(tree)
    found = []
    for node in ast.walk(tree):
        line = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and node.attr in INTERNALS:
            found.append(f"{line}: .{node.attr}")
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in NOT_MODELOPT:
            mine = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls") and node.attr in own
            if not mine:
                found.append(f"{line}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTRIBUTE_CALLS:
            for arg in node.args[1:2]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _private(arg.value):
                    found.append(f"{line}: {node.func.id}(..., {arg.value!r})")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modelopt"):
            found += [f"{line}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Name) and node.id in INTERNALS:
            found.append(f"{line}: {node.id}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in INTERNALS:
            found.append(f"{line}: {node.value!r}")
        elif isinstance(node, ast.alias) and node.name.rpartition(".")[2] in INTERNALS:
            found.append(f"{line}: import {node.name}")
    return found


def test_no_module_but_patches_touches_a_modelopt_private():
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p != PATCHES)
    assert len(modules) > 20
    found = [v for p in modules for v in violations(p.read_text(), str(p.relative_to(PACKAGE)))]
    assert not found, "\n".join(found)


def test_patches_is_where_the_internals_are_touched():
    """The rule is not vacuous: patches.py itself does each of the things the rule forbids elsewhere."""
    found = violations(PATCHES.read_text(), "patches.py")
    for needle in ("._calib_amax", ".layer_sync_moe_local_experts_amax", "SharedWeightGlobalAmaxState", "._disabled"):
        assert any(needle in v for v in found), needle


@pytest.mark.parametrize(
    "source",
    [
        "def f(c):\n    return c._calib_amax\n",
        "class C:\n    def f(self):\n        return self._calib_amax\n",  # a ModelOpt base class's attribute
        "def f(q):\n    return getattr(q, '_amax', None)\n",
        "from modelopt.torch.quantization.model_calib import _check_moe_calibration_complete\n",
        "def f(m):\n    m.layer_sync_moe_local_experts_amax(sync_weight_amax=False)\n",
        "from modelopt.torch.quantization.utils import SharedQuantState\n",
    ],
)
def test_each_kind_of_touch_is_caught(source):
    assert violations(source, "x.py")


def test_own_underscore_attributes_and_torch_view_base_are_allowed():
    source = (
        "class C:\n    def __init__(self):\n        self._rows = []\n    def f(self, w):\n"
        "        return self._rows, w._base, self._g()\n    def _g(self):\n        return 1\n"
    )
    assert violations(source, "x.py") == []

"""The layer rules of ``moeq_triton``, checked from the source (every import, lazy ones inside functions included).

Layers, bottom first.  A module may import its own unit (subpackage or top-level module) and any unit of a lower
layer; units of one layer are peers and do not import each other.

  0  kernels                                compute: torch, triton, numpy and the standard library only
  1  version, naming, distributed, memory   foundations that know no format, file or framework
  2  checkpoint                             the on-disk side (formats, reading, the quantize job, inspect)
  3  modelopt                               the only importer of ModelOpt
  4  export                                 a model's tensors under HF names, written through checkpoint/
  5  synthetic, testing                     generated checkpoints; helpers shared by tests and benchmarks
  6  demo
  7  cli
  8  __main__, the package's __init__       entry points (the __init__ loads the backend and the exporter lazily)

Besides: no import cycle between modules; no ``_private`` name crosses a module boundary (imported, or read as
``module._name``); each third-party package only where ``THIRD_PARTY`` places it; a public function (or method of
a public class) takes at most four positional parameters, the rest keyword-only (Triton device functions, whose
callers are the compiler's, and the signatures listed in ``EXTERNAL_SIGNATURES`` excepted), and a dataclass of more
than four fields is ``kw_only=True`` (its constructor is such a function).

Each rule is checked over the real tree and over a made-up violating package (``test_every_rule_catches``), so no
rule passes by checking nothing.  ``KNOWN`` lists what is still in violation, why, and who fixes it; an entry that
no longer matches fails too, so it is removed when fixed.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "moeq_triton"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("kernels",),
    ("version", "naming", "distributed", "memory"),
    ("checkpoint",),
    ("modelopt",),
    ("export",),
    ("synthetic", "testing"),
    ("demo",),
    ("cli",),
    ("__main__", "__init__"),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}

ANYWHERE = ("",)  # a module-name prefix every module has
ABOVE_KERNELS = tuple(unit for units in LAYERS[1:] for unit in units)
THIRD_PARTY: dict[str, tuple[str, ...]] = {
    # package -> where it may be imported (units, or dotted module names below the package)
    "torch": ANYWHERE,
    "triton": ANYWHERE,
    "numpy": ANYWHERE,
    "rich": ABOVE_KERNELS,  # a base dependency (tables, progress), never in the compute layer
    "safetensors": ("checkpoint", "synthetic"),  # the on-disk side (synthetic writes the default checkpoint)
    "modelopt": ("modelopt",),  # the [modelopt] extra
    "pydantic": ("modelopt",),  # ModelOpt's config models (a ModelOpt dependency, not ours)
    "transformers": ("export",),  # the [hf] extra: transformers' own reverse weight conversion
    "megatron": ("export", "modelopt.sync_groups"),  # the [megatron] extra: its renames and its process groups
    "huggingface_hub": ("checkpoint.hub",),  # a base dependency: --model org/name fetched into the Hub cache
}

EXTERNAL_SIGNATURES = {
    ("moeq_triton.modelopt.weight_calibration", "max_calibrate"): "installed in place of ModelOpt's "
    "model_calib.max_calibrate, whose positional signature ModelOpt's callers use",
}

KNOWN: dict[tuple[str, str, str], str] = {
    # (file, rule, subject): why it is still there and who removes it
}


@dataclass(frozen=True)
class Violation:
    path: str  # relative to the scanned root
    line: int
    rule: str
    subject: str  # what KNOWN matches on: a module, a third-party package, a function
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


@dataclass(frozen=True)
class Import:
    path: str
    line: int
    importer: str  # dotted module name
    target: str  # dotted module name (an internal module, or the full third-party name)
    names: tuple[str, ...]  # the names a from-import takes from ``target`` (empty: the module itself)


@dataclass
class Tree:
    root: Path  # the directory holding the package
    modules: dict[str, Path]  # dotted name -> file
    asts: dict[str, ast.Module]

    def rel(self, module: str) -> str:
        return self.modules[module].relative_to(self.root).as_posix()


def scan(root: Path) -> Tree:
    modules: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return Tree(root, modules, {m: ast.parse(p.read_text(), str(p)) for m, p in modules.items()})


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def internal(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def imports(tree: Tree) -> list[Import]:
    """Every import statement of every module, at any depth (function bodies, ``if`` blocks, ``try``)."""
    found: list[Import] = []
    for module, node_tree in tree.asts.items():
        is_package = tree.modules[module].name == "__init__.py"
        for node in ast.walk(node_tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _known_prefix(tree, alias.name) if internal(alias.name) else alias.name
                    found.append(Import(tree.rel(module), node.lineno, module, target, ()))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join([*package, base] if base else package)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if internal(base) and sub in tree.modules:
                        found.append(Import(tree.rel(module), node.lineno, module, sub, ()))
                    else:
                        target = _known_prefix(tree, base) if internal(base) else base
                        found.append(Import(tree.rel(module), node.lineno, module, target, (alias.name,)))
    return found


def _known_prefix(tree: Tree, dotted: str) -> str:
    parts = dotted.split(".")
    while parts and ".".join(parts) not in tree.modules:
        parts.pop()
    return ".".join(parts) or dotted


def check_placed(tree: Tree) -> list[Violation]:
    return [
        Violation(
            tree.rel(m),
            1,
            "layer",
            m,
            f"{m} is in no layer: place unit {unit_of(m)!r} in LAYERS "
            "(tests/test_layering.py) and in the README's Layers paragraph",
        )
        for m in tree.modules
        if unit_of(m) not in RANK
    ]


def check_layers(tree: Tree) -> list[Violation]:
    """Imports point downward: to the importer's own unit or to a unit of a lower layer."""
    out = []
    for imp in imports(tree):
        if not internal(imp.target):
            continue
        mine, theirs = unit_of(imp.importer), unit_of(imp.target)
        if mine == theirs or mine not in RANK or theirs not in RANK:
            continue  # unplaced units are reported by check_placed
        if RANK[theirs] >= RANK[mine]:
            how = "a peer" if RANK[theirs] == RANK[mine] else "a higher layer"
            out.append(
                Violation(
                    imp.path,
                    imp.line,
                    "layer",
                    imp.target,
                    f"{imp.importer} ({mine}, layer {RANK[mine]}) imports {imp.target} ({theirs}, "
                    f"{how}: layer {RANK[theirs]}); imports point downward only",
                )
            )
    return out


def check_cycles(tree: Tree) -> list[Violation]:
    """No cycle in the module graph (Tarjan's strongly connected components), lazy imports included."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in tree.modules}
    for imp in imports(tree):
        if internal(imp.target) and imp.target in tree.modules and imp.target != imp.importer:
            edges[imp.importer].setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for component in components:
        inside = [imp for m in component for t, imp in sorted(edges[m].items()) if t in component]
        chain = "; ".join(f"{i.path}:{i.line} imports {i.target}" for i in inside)
        first = inside[0]
        out.append(
            Violation(
                first.path,
                first.line,
                "cycle",
                " ".join(component),
                f"import cycle between {', '.join(component)}: {chain}",
            )
        )
    return out


def check_private(tree: Tree) -> list[Violation]:
    """No ``_private`` name of one module is used by another: neither imported nor read as ``module._name``."""
    out = []
    every = imports(tree)
    for imp in every:
        for name in imp.names:
            if internal(imp.target) and imp.target != imp.importer and _private(name):
                out.append(
                    Violation(
                        imp.path,
                        imp.line,
                        "private",
                        imp.target,
                        f"{imp.importer} imports {name} from {imp.target}: a private name crosses a module boundary",
                    )
                )
    for module, node_tree in tree.asts.items():
        aliases = _module_aliases(tree, node_tree)
        for node in ast.walk(node_tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
                target = aliases.get(node.value.id)
                if target is not None and target != module:
                    out.append(
                        Violation(
                            tree.rel(module),
                            node.lineno,
                            "private",
                            target,
                            f"{module} reads {node.value.id}.{node.attr} of {target}: a private name "
                            "crosses a module boundary",
                        )
                    )
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_aliases(tree: Tree, node_tree: ast.Module) -> dict[str, str]:
    """Local names bound to an internal module by an import anywhere in the file."""
    aliases = {}
    for node in ast.walk(node_tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if internal(alias.name) and alias.asname and alias.name in tree.modules:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and internal(node.module):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in tree.modules:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _allowed(module: str, places: tuple[str, ...]) -> bool:
    inner = module.split(".", 1)[1] if "." in module else "__init__"
    return any(place == "" or inner == place or inner.startswith(place + ".") for place in places)


def check_third_party(tree: Tree) -> list[Violation]:
    """Each third-party package only where THIRD_PARTY places it; the compute layer: torch, triton, numpy, stdlib."""
    out = []
    for imp in imports(tree):
        if internal(imp.target) or not imp.target:
            continue
        top = imp.target.split(".")[0]
        if top in sys.stdlib_module_names:
            continue
        places = THIRD_PARTY.get(top)
        if places is None:
            message = f"{imp.importer} imports {top}, which THIRD_PARTY (tests/test_layering.py) places nowhere"
        elif not _allowed(imp.importer, places):
            message = f"{imp.importer} imports {imp.target}; {top} may be imported only in {', '.join(places)}"
        else:
            continue
        out.append(Violation(imp.path, imp.line, "third-party", top, message))
    return out


def check_keyword_only(tree: Tree) -> list[Violation]:
    """A public function, or a public method of a public class, takes at most four positional parameters."""
    out = []
    for module, node_tree in tree.asts.items():
        for node in node_tree.body:
            functions: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]] = []  # (function, its class)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _private(node.name):
                functions.append((node, ""))
            elif isinstance(node, ast.ClassDef) and not _private(node.name):
                for member in node.body:
                    if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not _private(member.name) or member.name in ("__init__", "__call__", "__new__")
                    ):
                        functions.append((member, node.name))
            for function, owner in functions:
                if any(ast.unparse(d).split("(")[0].endswith("jit") for d in function.decorator_list):
                    continue  # a Triton device function: the compiler calls it, and takes no keyword-only form
                if (module, function.name) in EXTERNAL_SIGNATURES:
                    continue
                positional = [a.arg for a in (*function.args.posonlyargs, *function.args.args)]
                static = any(ast.unparse(d) == "staticmethod" for d in function.decorator_list)
                if owner and not static and positional and positional[0] in ("self", "cls"):
                    positional = positional[1:]
                if len(positional) > 4:
                    qualified = f"{module}.{owner + '.' if owner else ''}{function.name}"
                    message = (
                        f"{qualified} takes {len(positional)} positional parameters ({', '.join(positional)}): "
                        "put those after the fourth behind `*`"
                    )
                    out.append(Violation(tree.rel(module), function.lineno, "keyword-only", function.name, message))
    return out


def check_dataclass_keyword_only(tree: Tree) -> list[Violation]:
    """A dataclass with more than four fields (annotated class attributes, ``ClassVar`` excepted) is
    ``@dataclass(kw_only=True)``: its generated constructor obeys the same rule as a function's."""
    out = []
    for module, node_tree in tree.asts.items():
        for node in ast.walk(node_tree):
            if not isinstance(node, ast.ClassDef):
                continue
            decorator = next((d for d in node.decorator_list if _decorator_name(d) == "dataclass"), None)
            if decorator is None:
                continue
            fields = [
                m.target.id
                for m in node.body
                if isinstance(m, ast.AnnAssign)
                and isinstance(m.target, ast.Name)
                and "ClassVar" not in ast.unparse(m.annotation)
            ]
            keyword_only = isinstance(decorator, ast.Call) and any(
                k.arg == "kw_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in decorator.keywords
            )
            if len(fields) > 4 and not keyword_only:
                message = (
                    f"{module}.{node.name} is a dataclass of {len(fields)} fields ({', '.join(fields)}): "
                    "make it @dataclass(kw_only=True)"
                )
                out.append(Violation(tree.rel(module), node.lineno, "keyword-only", node.name, message))
    return out


def _decorator_name(decorator: ast.expr) -> str:
    """``dataclass`` for @dataclass, @dataclass(...), @dataclasses.dataclass(...)."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target).rpartition(".")[2]


RULES = {
    "layer": lambda tree: check_placed(tree) + check_layers(tree),
    "cycle": check_cycles,
    "private": check_private,
    "third-party": check_third_party,
    "keyword-only": lambda tree: check_keyword_only(tree) + check_dataclass_keyword_only(tree),
}


def unexpected(found: list[Violation]) -> list[Violation]:
    return [v for v in found if (v.path, v.rule, v.subject) not in KNOWN]


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_holds(rule: str) -> None:
    found = RULES[rule](scan(ROOT))
    bad = unexpected(found)
    assert not bad, f"{len(bad)} violation(s) of the {rule!r} rule:\n" + "\n".join(map(str, bad))
    stale = [key for key in KNOWN if key[1] == rule and not any((v.path, v.rule, v.subject) == key for v in found)]
    assert not stale, f"KNOWN entries no longer violated (remove them from tests/test_layering.py): {stale}"


def test_layers_cover_the_tree() -> None:
    tree = scan(ROOT)
    units = {unit_of(m) for m in tree.modules}
    assert units == set(RANK), f"units in the tree {sorted(units)} != units in LAYERS {sorted(RANK)}"


BAD_PACKAGE = {
    "__init__.py": "",
    "kernels/__init__.py": "",
    "kernels/bad.py": (
        "import modelopt\n"  # 1: third-party in the compute layer
        "from moeq_triton.checkpoint import io\n"  # 2: upward
        "import safetensors.torch\n"  # 3: third-party in the compute layer
        "def _secret():\n"
        "    pass\n"
    ),
    "checkpoint/__init__.py": "",
    "checkpoint/io.py": (
        "from moeq_triton.kernels.bad import _secret\n"  # 1: private import
        "from moeq_triton.kernels import bad\n"
        "def write(a, b, c, d, e):\n"  # 3: five positional parameters
        "    from moeq_triton.export import hf\n"  # 4: lazy upward
        "    return bad._secret()\n"  # 5: private attribute
        "def ok(a, b, c, d, *, e):\n"
        "    import megatron.core\n"  # 7: megatron outside its places
        "class Public:\n"
        "    def method(self, a, b, c, d, e):\n"  # 9: five positional parameters besides self
        "        pass\n"
        "    def _private(self, a, b, c, d, e):\n"
        "        pass\n"
    ),
    "naming/__init__.py": "from moeq_triton import distributed\n",  # 1: a peer
    "distributed.py": "import yaml\n",  # 1: a third-party package placed nowhere
    "checkpoint/records.py": (
        "from dataclasses import dataclass, field\n"
        "import typing\n"
        "@dataclass\n"
        "class Five:\n"  # 4: a dataclass of five fields, positional
        "    a: int\n"
        "    b: int\n"
        "    c: int\n"
        "    d: int = 0\n"
        "    e: list = field(default_factory=list)\n"
        "@dataclass(frozen=True, kw_only=False)\n"
        "class Said:\n"  # 11: kw_only given, but False
        "    a: int\n    b: int\n    c: int\n    d: int\n    e: int\n"
        "@dataclass(kw_only=True)\n"
        "class Fine:\n"
        "    a: int\n    b: int\n    c: int\n    d: int\n    e: int\n"
        "@dataclass\n"
        "class Four:\n"  # four fields and a ClassVar: positional is fine
        "    a: int\n    b: int\n    c: int\n    d: int\n    k: typing.ClassVar[int] = 1\n"
    ),
    "export/__init__.py": "",
    "export/hf.py": "from . import other\n",  # 1: cycle with other.py
    "export/other.py": "def f():\n    from moeq_triton.export import hf\n",  # 2: lazy, closes the cycle
    "newthing.py": "",  # in no layer
}

EXPECTED = {
    ("moeq_triton/kernels/bad.py", 1, "third-party"),
    ("moeq_triton/kernels/bad.py", 2, "layer"),
    ("moeq_triton/kernels/bad.py", 3, "third-party"),
    ("moeq_triton/checkpoint/io.py", 1, "private"),
    ("moeq_triton/checkpoint/io.py", 1, "cycle"),  # io imports bad, which imports io
    ("moeq_triton/checkpoint/io.py", 3, "keyword-only"),
    ("moeq_triton/checkpoint/io.py", 4, "layer"),
    ("moeq_triton/checkpoint/io.py", 5, "private"),
    ("moeq_triton/checkpoint/io.py", 7, "third-party"),
    ("moeq_triton/checkpoint/io.py", 9, "keyword-only"),
    ("moeq_triton/checkpoint/records.py", 4, "keyword-only"),
    ("moeq_triton/checkpoint/records.py", 11, "keyword-only"),
    ("moeq_triton/naming/__init__.py", 1, "layer"),
    ("moeq_triton/distributed.py", 1, "third-party"),
    ("moeq_triton/export/hf.py", 1, "cycle"),
    ("moeq_triton/newthing.py", 1, "layer"),
}


def test_every_rule_catches(tmp_path: Path) -> None:
    """A made-up package breaking every rule once: each violation is reported, with its file and line, and
    nothing else is."""
    for name, text in BAD_PACKAGE.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    tree = scan(tmp_path)
    found = [v for check in RULES.values() for v in check(tree)]
    got = {(v.path, v.line, v.rule) for v in found}
    assert got == EXPECTED, "\n".join(map(str, found))
    cycle = next(v for v in found if v.rule == "cycle")
    assert "moeq_triton/export/other.py:2 imports moeq_triton.export.hf" in cycle.message, cycle.message
    assert all(str(v).startswith(f"{v.path}:{v.line}: ") for v in found)

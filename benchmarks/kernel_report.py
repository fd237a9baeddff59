"""Static budget of the grouped kernels on sm_90 / sm_100, compiled offline on a CPU (no GPU needed).

    python -m benchmarks.kernel_report [--arch 90,100] [--dtype bf16] [--check]

Why: a GPU is rarely lent here, but Triton compiles for any target offline and its wheel ships
ptxas and nvdisasm, so the SASS of each kernel's main loop can be counted on a CPU.  The launches
are the real ones: the public functions run with their CUDA decisions (CUDA tiles, hardware math)
on small CPU tensors, and ``grouping.launch`` is replaced by a recorder that compiles what it would
have launched, with the specialization a CUDA launch gives (pointers 16-byte aligned -> divisibility).

Per kernel and target, for the main loop (the innermost SASS loop holding global loads, the one with
the most of them): SASS instructions per element a thread loads, load / store widths, spill bytes
(STL), BAR / SHFL in the loop, and the dependent global loads before the loop's first weight load.
``--check`` exits 1 when a budget of BUDGETS (sm_90, bf16) is broken; tests/test_kernel_budget.py
runs the same check in CI.

NVFP4 launches twice per dtype on CUDA (kernels/nvfp4.py): ``nvfp4`` is the common-regime launch
(2^-64 <= amax <= 2^16; float32 weights <= 8), which the budget applies to, and ``nvfp4_fallback``
the general one for every other tensor, reported beside it without a budget.

FP8-block sources (``FP8BlockSource``: e4m3 codes + 128x128 block scales, one launch of their own) are
recorded too, as ``NAME/src`` beside the launch ``NAME`` of the same output (issue 25).  Their elements
are codes (8 bits); the code loads are the loads wider than 32 bits, and the 32-bit loads in their loop
are block scales (``scl`` column: one per 16 codes at most).  Budget: at most 2 SASS instructions per
element above ``NAME``'s figure in the same run, code loads of 64 bits or wider, the rest as ``NAME``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret (set before triton is imported)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moeq_triton import kernels  # noqa: E402
from moeq_triton.kernels import amax as amax_module  # noqa: E402
from moeq_triton.kernels import fp8 as fp8_module  # noqa: E402
from moeq_triton.kernels import fp8_block as fp8_block_module  # noqa: E402
from moeq_triton.kernels import grouping  # noqa: E402
from moeq_triton.kernels import nvfp4 as nvfp4_module  # noqa: E402

KERNEL_MODULES = (amax_module, fp8_module, fp8_block_module, nvfp4_module)

# Every host decision that depends on the device, answered as on CUDA.  A kernel module that decides on
# ``device.type`` anywhere else compiles a CPU specialization here (tests/test_kernel_budget.py checks).
CUDA_DECISIONS = {
    "tiles_for": lambda table, device: table["cuda"],
    "hardware_math": lambda device: True,
    "divides_by_reciprocal": lambda device: True,
    "casts_scalar_divisor": lambda device: True,
    "use_triton": lambda device: True,
}

# Issue 12, sm_90, bf16 weights, the tiles the launchers choose on CUDA.
BUDGETS = {
    "amax": {"sass_per_el": 5.0, "ld_bits": 128, "st_bits": 0, "spill": 0, "sync": 0, "chain": 2},
    "row_amax": {"sass_per_el": 5.0, "ld_bits": 128, "st_bits": 0, "spill": 0, "sync": 0, "chain": 2},
    "nvfp4": {"sass_per_el": 16.0, "ld_bits": 128, "st_bits": 32, "spill": 0, "sync": 0, "chain": 2},
    "fp8": {"sass_per_el": 12.0, "ld_bits": 128, "st_bits": 32, "spill": 0, "sync": 0, "chain": 2},
    "fp8_channel": {"sass_per_el": 12.0, "ld_bits": 128, "st_bits": 32, "spill": 0, "sync": 0, "chain": 2},
    "fp8_channel+amax": {"sass_per_el": 12.0, "ld_bits": 128, "st_bits": 32, "spill": 0, "sync": 0, "chain": 2},
    "fp8_block": {"sass_per_el": 12.0, "ld_bits": 128, "st_bits": 32, "spill": 0, "sync": 0, "chain": 2},
}
BUDGET_ARCH = 90

SOURCE_SUFFIX = "/src"
SOURCE_EXTRA_SASS_PER_EL = 2.0  # issue 25: the fused dequantization's price per element, at most
SOURCE_BUDGETS = {
    name + SOURCE_SUFFIX: {**budget, "ld_bits": 64, "codes_per_scale_load": 16} for name, budget in BUDGETS.items()
}
"""An FP8-block source launch's budget; its sass_per_el is relative (see SOURCE_EXTRA_SASS_PER_EL)."""

TORCH_TO_TRITON = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.float8_e4m3fn: "fp8e4nv",
}


@dataclass
class Launch:
    """One launch as the launcher would issue it on CUDA."""

    name: str
    fn: object  # the JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]
    attrs: dict[tuple[int, ...], list]
    num_warps: int
    elem_bits: int
    source: bool = False


@dataclass
class Report:
    name: str
    arch: int
    sass_per_el: float
    ld_bits: int  # narrowest global load in the main loop
    st_bits: int  # narrowest global store in the main loop (0: none)
    spill: int
    sync: int
    chain: int
    loop_sass: int
    regs: int
    notes: list[str] = field(default_factory=list)
    source: bool = False
    scale_loads: int = 0  # FP8-block sources: 32-bit loads (block scales) in the main loop
    elements: float = 0.0  # elements (codes, for sources) one thread loads per main-loop iteration
    base_sass_per_el: float | None = None  # sources: the same output's launch from a 16-bit weight, same run


def record_launches(dtype: torch.dtype) -> list[Launch]:
    """Run the public API with CUDA decisions on CPU tensors; record, never run, each launch."""
    launches: list[Launch] = []

    def recorder(name, kernel, weights, tiles, args=(), outputs=(), per_dtype=None, **constexprs):
        for g in grouping.groups_for(weights, tiles.rows):
            extra = per_dtype(g.dtype) if per_dtype else {}
            values = [g.table, g.tile_map, g.table, grouping.storage(weights[g.indices[0]]), *args]
            const = {"ALIGNED": g.aligned, "VEC": g.vec, "BLOCK_R": tiles.rows, "SOURCE": g.source}
            const.update(constexprs, **extra)
            names = [p.name for p in kernel.params]
            signature, attrs = {}, {}
            for i, p in enumerate(kernel.params):
                if p.name in const:
                    signature[p.name] = "constexpr"
                    continue
                v = values[i]
                if isinstance(v, torch.Tensor):
                    signature[p.name] = "*" + TORCH_TO_TRITON[v.dtype]
                    if v.data_ptr() % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
                else:
                    raise TypeError(f"{name}: argument {p.name} is not a tensor; teach kernel_report about it")
            constexprs_by_name = {k: v for k, v in const.items() if k in names}
            label = name
            if name == "fp8" and const.get("PER_CHANNEL"):
                label = "fp8_channel" + ("" if const.get("HAS_ROW_AMAX") else "+amax")
            if g.source:
                label += SOURCE_SUFFIX
            bits = 8 if g.source else g.dtype.itemsize * 8
            launches.append(Launch(label, kernel, signature, constexprs_by_name, attrs, tiles.warps, bits, g.source))

    patched = {"launch": recorder, **CUDA_DECISIONS}
    saved = []
    for module in (*KERNEL_MODULES, grouping):
        for attr, value in patched.items():
            if hasattr(module, attr):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, value)
    try:
        gen = torch.Generator().manual_seed(0)
        stacked = (torch.randn(3, 64, 256, generator=gen) * 0.02).to(dtype)
        weights = [stacked[0], stacked[1], (torch.randn(32, 512, generator=gen) * 0.02).to(dtype)]
        amax = torch.stack([w.abs().amax().float() for w in weights])
        rows = [w.abs().amax(-1).float() for w in weights]
        # FP8-block sources of the same shapes (finite codes, DeepSeek-like scales): their own launches
        sources = [
            kernels.FP8BlockSource(
                (w.float() * 8000).clamp(-448, 448).to(torch.float8_e4m3fn),
                torch.full((-(-w.shape[0] // 128), -(-w.shape[1] // 128)), 2.5e-6),
            )
            for w in (torch.randn(shape, generator=gen) for shape in ((64, 256), (64, 256), (32, 512)))
        ]
        source_amax = torch.stack([w.dequantize().abs().amax().float() for w in sources])
        source_rows = [w.dequantize().abs().amax(-1).float() for w in sources]
        calls = []
        for ws, a, r in ((weights, amax, rows), (sources, source_amax, source_rows)):
            calls += [
                lambda ws=ws: kernels.grouped_amax(ws),
                lambda ws=ws: kernels.grouped_row_amax(ws),
                lambda ws=ws, a=a: kernels.quantize_nvfp4(ws, a),
                lambda ws=ws, a=a: kernels.quantize_fp8(ws, a),
                lambda ws=ws, r=r: kernels.quantize_fp8(ws, r, per_channel=True),
                lambda ws=ws: kernels.quantize_fp8(ws, per_channel=True),
                lambda ws=ws: kernels.quantize_fp8_block(ws),
            ]
        for call in calls:
            try:
                call()
            except ValueError:
                pass  # the recorded kernels did not run, so the outputs are not meaningful
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
    seen, unique = set(), []
    for launch in launches:
        if launch.name not in seen:
            seen.add(launch.name)
            unique.append(launch)
    return unique


def compile_sass(launch: Launch, arch: int) -> tuple[str, int]:
    """(SASS text, registers) of one launch compiled for sm_<arch>."""
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run(
            [knobs.nvidia.nvdisasm.path, "-c", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        usage = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+)", usage)
    return sass, int(m.group(1)) if m else -1


INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_\w+):")


def parse(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """Instructions (index, text without predicate comments) and label -> instruction index."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        m = LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = INSTR.search(line)
        if m:
            instrs.append((len(instrs), m.group(2)))
    return instrs, labels


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] if text else ""


def is_global_load(op: str) -> bool:
    return op.startswith("LDG")


def width(op: str) -> int:
    for bits in (128, 64, 16, 8):
        if f".{bits}" in op or (bits < 32 and (f".U{bits}" in op or f".S{bits}" in op)):
            return bits
    return 32


def loops(instrs, labels) -> list[tuple[int, int]]:
    """(start, end) of every backward branch's body."""
    out = []
    for i, text in instrs:
        m = re.search(r"\bBRA\b.*?`?\((\.L_\w+)\)|\bBRA\b\s+`?(\.L_\w+)", text)
        if m:
            target = labels.get(m.group(1) or m.group(2))
            if target is not None and target <= i:
                out.append((target, i))
    return out


REG = re.compile(r"\bR(\d+)(\.64)?\b")


def load_chain(instrs, first_load: int) -> int:
    """Dependent global loads before the first weight load (``first_load``): the deepest chain of
    loads whose results feed other loads' addresses before it, counting the last one."""
    depth: dict[int, int] = {}
    deepest = 0
    for i, text in instrs[: first_load + 1]:
        op = opcode(text)
        operands = re.sub(r"^@!?U?P\w+\s+", "", text)[len(op) :]
        parts = [p.strip() for p in operands.split(",")]
        if not parts or not parts[0]:
            continue
        writes_store = op.startswith(("ST", "RED", "ATOM", "BRA", "EXIT", "BAR", "ISETP", "FSETP"))
        dest = [] if writes_store else regs_of(parts[0], wide=".WIDE" in op or op.startswith("LDG.E.64"))
        if op.startswith("LDG.E.128"):
            dest = regs_of(parts[0], wide=False, count=4)
        sources = [r for p in (parts if writes_store else parts[1:]) for r in regs_of(p, wide=".64" in p)]
        level = max((depth.get(r, 0) for r in sources), default=0)
        if i == first_load:
            return max(level, deepest)
        if is_global_load(op):
            level += 1
            deepest = max(deepest, level)
        for r in dest:
            depth[r] = level
    return deepest


def regs_of(text: str, wide: bool, count: int = 1) -> list[int]:
    found = []
    for m in REG.finditer(text):
        n = int(m.group(1))
        k = 2 if (wide or m.group(2)) else count
        found += list(range(n, n + k))
    return found


def analyze(launch: Launch, arch: int) -> Report:
    sass, regs = compile_sass(launch, arch)
    instrs, labels = parse(sass)
    candidates = []
    for start, end in loops(instrs, labels):
        body = instrs[start : end + 1]
        loads = [t for _, t in body if is_global_load(opcode(t))]
        if loads:
            candidates.append((start, end, len(loads)))
    inner = [c for c in candidates if not any(o != c and c[0] <= o[0] and o[1] <= c[1] for o in candidates)]
    start, end, _ = max(inner, key=lambda c: (c[2], c[1] - c[0]))
    body = [t for _, t in instrs[start : end + 1]]
    ops = [opcode(t) for t in body]
    loads = [o for o in ops if is_global_load(o)]
    scale_loads = 0
    if launch.source:  # codes: the wide loads; block scales: the 32-bit ones
        scale_loads = sum(width(o) <= 32 for o in loads)
        loads = [o for o in loads if width(o) > 32] or loads
    stores = [o for o in ops if o.startswith("STG")]
    elements = sum(width(o) for o in loads) / launch.elem_bits
    spill = sum(width(opcode(t)) // 8 for _, t in instrs if opcode(t).startswith("STL"))
    sync = sum(o.startswith(("BAR", "SHFL")) for o in ops)
    # the first weight byte: the kernel's first load of the main loop's kind (a first pass over the
    # rows, or a pipelined or unrolled prologue, reads weights before the main loop does)
    weight_load = min((width(o), o) for o in loads)[1]
    first_load = next(i for i, t in instrs if opcode(t) == weight_load)
    return Report(
        launch.name,
        arch,
        round(len(body) / elements, 2),
        min(width(o) for o in loads),
        min((width(o) for o in stores), default=0),
        spill,
        sync,
        load_chain(instrs, first_load),
        len(body),
        regs,
        source=launch.source,
        scale_loads=scale_loads,
        elements=elements,
    )


def violations(report: Report) -> list[str]:
    budget = BUDGETS.get(report.name) or SOURCE_BUDGETS.get(report.name)
    if budget is None or report.arch != BUDGET_ARCH:
        return []
    found = []
    limit = budget["sass_per_el"]
    if report.name in SOURCE_BUDGETS:
        if report.base_sass_per_el is None:
            return [f"no {report.name.removesuffix(SOURCE_SUFFIX)} launch in the same run to compare with"]
        limit = round(report.base_sass_per_el + SOURCE_EXTRA_SASS_PER_EL, 2)
        if report.scale_loads * budget["codes_per_scale_load"] > report.elements:
            found.append(f"{report.scale_loads} 32-bit loads per {report.elements:g} codes")
    if report.sass_per_el > limit:
        found.append(f"{report.sass_per_el} SASS/element > {limit}")
    if report.ld_bits < budget["ld_bits"]:
        found.append(f"{report.ld_bits}-bit loads < {budget['ld_bits']}")
    if budget["st_bits"] and report.st_bits < budget["st_bits"]:
        found.append(f"{report.st_bits}-bit stores < {budget['st_bits']}")
    if report.spill > budget["spill"]:
        found.append(f"{report.spill} spill bytes")
    if report.sync > budget["sync"]:
        found.append(f"{report.sync} BAR/SHFL in the loop")
    if report.chain > budget["chain"]:
        found.append(f"{report.chain} dependent loads before the first weight load > {budget['chain']}")
    return found


def reports(arches: list[int], dtype: torch.dtype) -> list[Report]:
    found = [analyze(launch, arch) for launch in record_launches(dtype) for arch in arches]
    by_key = {(r.name, r.arch): r for r in found}
    for r in found:
        base = by_key.get((r.name.removesuffix(SOURCE_SUFFIX), r.arch))
        if r.name.endswith(SOURCE_SUFFIX) and base is not None:
            r.base_sass_per_el = base.sass_per_el
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90,100")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--check", action="store_true", help="exit 1 when a budget (sm_90, bf16) is broken")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = reports([int(a) for a in args.arch.split(",")], dtype)
    print(f"triton {triton.__version__}, {args.dtype} weights, CUDA tiles; main loop per element one thread loads")
    header = f"{'kernel':<21}{'sm':>4}{'sass/el':>9}{'+src':>6}{'ld':>5}{'scl':>4}{'st':>5}{'spill':>7}{'sync':>6}"
    header += f"{'chain':>7}{'loop':>6}{'regs':>6}  budget"
    print(header)
    broken = 0
    for r in rows:
        v = violations(r)
        broken += bool(v)
        budgeted = (r.name in BUDGETS or r.name in SOURCE_BUDGETS) and r.arch == BUDGET_ARCH
        verdict = "; ".join(v) if v else ("met" if budgeted else "-")
        extra = "-" if r.base_sass_per_el is None else f"{r.sass_per_el - r.base_sass_per_el:+.2f}"
        print(
            f"{r.name:<21}{r.arch:>4}{r.sass_per_el:>9}{extra:>6}{r.ld_bits:>5}{r.scale_loads if r.source else '-':>4}"
            f"{r.st_bits or '-':>5}{r.spill:>7}{r.sync:>6}{r.chain:>7}{r.loop_sass:>6}{r.regs:>6}  {verdict}"
        )
    return 1 if args.check and broken else 0


if __name__ == "__main__":
    sys.exit(main())

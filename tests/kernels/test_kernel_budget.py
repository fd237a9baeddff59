"""The static SASS budgets of issue 12 (sm_90, bf16), compiled offline on CPU by tools/kernel_report.py.

A kernel that falls back to 16-bit loads, grows a per-element division, spills, or reaches its first
weight byte through a longer chain of table loads fails here, without a GPU.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[2] / "tools" / "kernel_report.py"


@pytest.fixture(scope="module")
def table() -> dict[str, list[str]]:
    """kernel name -> violations on sm_90 (a subprocess: the report compiles with TRITON_INTERPRET=0)."""
    code = (
        "import json; import tools.kernel_report as k; "
        "print(json.dumps({r.name: k.violations(r) for r in k.reports([90], k.torch.bfloat16)}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPORT.parent.parent, capture_output=True, text=True, timeout=600, check=True
    )
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


OVER_SOURCE_BUDGET = pytest.mark.xfail(
    strict=True,
    reason="issue 25, not met (sm_90, bf16 base, triton 3.7.1): nvfp4/src +2.58 SASS/element over the bf16 launch "
    "(budget +2): the decode (cvt.rn.f16x2.e4m3x2, f16 -> f32, the scale product, the bf16 rounding: 3.5 per "
    "element) against the bf16 words' 1 per element; benchmarks/RESULTS.md",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel",
    [
        "amax",
        "row_amax",
        "fp8",
        "fp8_channel",
        "fp8_channel+amax",
        "fp8_block",
        "nvfp4",  # the common-regime launch; nvfp4_fallback (the rest) is reported, not budgeted
        # FP8-block sources (issue 25): at most 2 SASS/element above the launch of the same output from bf16,
        # code loads of 64 bits or wider, at most one 32-bit (scale) load per 16 codes, the rest as that launch
        "amax/src",
        "row_amax/src",
        "fp8_block/src",
        pytest.param("nvfp4/src", marks=OVER_SOURCE_BUDGET),
        "fp8/src",
        "fp8_channel/src",
        "fp8_channel+amax/src",
    ],
)
def test_kernel_meets_sm90_budget(table, kernel):
    assert kernel in table, f"{kernel} was not launched by the public API (launches seen: {sorted(table)})"
    assert table[kernel] == [], f"{kernel} on sm_90: " + "; ".join(table[kernel])


def test_kernel_report_answers_every_device_decision_as_cuda():
    """kernel_report compiles what a CUDA launch would compile only if every host decision that reads
    ``device.type`` is one it patches: the FP8 scale's dtype (SCALE_KIND) decided inline once made it
    count a CPU specialization (11.9 SASS/element where CUDA compiles 12.2).  Parsed, not imported."""
    patched: set[str] = set()
    for node in ast.parse(REPORT.read_text()).body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if getattr(target, "id", None) == "CUDA_DECISIONS":
                patched = {k.value for k in node.value.keys}
    assert patched, "CUDA_DECISIONS not found in tools/kernel_report.py"
    # _to_device only chooses a pinned copy; native.py is the C loop of the CPU engine
    allowed = patched | {"_to_device"}
    deciding = []
    for path in sorted((REPORT.parents[1] / "moeq_triton" / "kernels").glob("*.py")):
        if path.name == "native.py":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and "device.type" in ast.unparse(fn):
                inner = [f for f in ast.walk(fn) if isinstance(f, ast.FunctionDef) and f is not fn]
                if not any("device.type" in ast.unparse(f) for f in inner):
                    deciding.append((path.name, fn.name))
    unpatched = [f"{file}:{name}" for file, name in deciding if name not in allowed]
    assert not unpatched, f"device decisions kernel_report does not answer as CUDA: {unpatched}"

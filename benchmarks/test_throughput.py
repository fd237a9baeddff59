"""pytest-benchmark cases: `pytest benchmarks --benchmark-only` (CPU: the torch references; GPU: Triton).

Small expert stacks with real Qwen3-30B-A3B aspect ratios; the side-by-side table with ratios is
benchmarks/run.py.  Each case checks its result bitwise once before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.run import check_kernels, expert_views
from moeq_triton.kernels import grouped_amax, quantize_fp8, quantize_nvfp4
from moeq_triton.testing import QWEN3_30B_A3B

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=[2, 8], ids=lambda e: f"{e}experts")
def experts(request):
    weights = expert_views(QWEN3_30B_A3B, 1, request.param, DEVICE)
    amax = grouped_amax(weights)
    check_kernels(weights, amax)
    return weights, amax


def test_grouped_amax(benchmark, experts):
    weights, _ = experts
    benchmark(grouped_amax, weights)


def test_quantize_nvfp4(benchmark, experts):
    weights, amax = experts
    benchmark(quantize_nvfp4, weights, amax)


def test_quantize_fp8(benchmark, experts):
    weights, amax = experts
    benchmark(quantize_fp8, weights, amax)

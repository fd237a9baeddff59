"""The device the kernel tests run on: CPU under the Triton interpreter by default, or the GPU.

``MOEQ_TEST_DEVICE=cuda pytest tests/test_kernels.py`` runs the same bitwise checks with real Triton
launches and ModelOpt's functions evaluated on the GPU (benchmarks/device_check.sh does this).
"""

from __future__ import annotations

import os

import torch

TEST_DEVICE = torch.device(os.environ.get("MOEQ_TEST_DEVICE", "cpu"))

"""Test-wide set-up: on CPU the Triton interpreter must be on before any kernel module is imported."""

import os

from device import TEST_DEVICE

if TEST_DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

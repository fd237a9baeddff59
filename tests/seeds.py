"""The one seed of a test run: every random input of the tests derives from it, so a failure reproduces.

``SEED`` is fixed (``MOEQ_TEST_SEED`` overrides it, to try other inputs on purpose).  conftest.py seeds torch's,
Python's and numpy's global generators with it before every test (so a test's inputs do not depend on which tests
ran before it), prints it in the report header and beside every failure; tests that draw from a generator of their
own seed it from ``SEED`` or a literal.  Spawned ranks (distributed_harness.py) seed their globals with
``SEED + rank``.
"""

from __future__ import annotations

import os
import random

SEED = int(os.environ.get("MOEQ_TEST_SEED", "20261207"))


def seed_everything(seed: int = SEED) -> None:
    """Seed the global generators a test may draw from without a generator of its own (model init, torch.randn)."""
    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def describe(seed: int = SEED) -> str:
    return f"random seed {seed} (rerun with MOEQ_TEST_SEED={seed}; tests/seeds.py)"

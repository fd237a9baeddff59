"""Every random input of the tests is reproducible: the run's seed (tests/seeds.py) starts every test, and no test
draws a seed of its own from the system."""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from tests.seeds import SEED, seed_everything

UNSEEDED = re.compile(r"SystemRandom|os\.urandom|secrets\.|torch\.Generator\(\)(?!\.manual_seed)|random\.Random\(\)")


def test_every_test_starts_from_the_run_seed():
    drawn = (torch.rand(3), random.random())  # the first draws of this test
    seed_everything(SEED)
    assert torch.equal(drawn[0], torch.rand(3)) and drawn[1] == random.random(), f"not seeded with {SEED}"


def test_no_test_draws_an_unrecorded_seed():
    tests = Path(__file__).resolve().parent
    found = [
        f"{path.relative_to(tests.parent)}:{number}: {line.strip()}"
        for path in sorted(tests.rglob("*.py"))
        if path.name != Path(__file__).name
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if UNSEEDED.search(line)
    ]
    assert not found, "random inputs without a recorded seed (use tests.seeds.SEED):\n" + "\n".join(found)

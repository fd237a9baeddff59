"""Test-wide set-up: on CPU the Triton interpreter must be on before any kernel module is imported; every test
starts from the run's fixed random seed (tests/seeds.py), named in the report header and beside each failure."""

import os
import socket

import pytest

from tests.device import TEST_DEVICE
from tests.seeds import describe, seed_everything

if TEST_DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config) -> str:
    return describe()


@pytest.fixture(autouse=True)
def fixed_seed() -> None:
    """torch's, Python's and numpy's global generators start every test from the run's seed."""
    seed_everything()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("random seed", describe()))


@pytest.fixture(scope="module")
def megatron_world():
    """gloo world of one process with Megatron's parallel_state (TP = EP = 1), torn down after."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()

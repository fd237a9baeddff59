"""Test-wide set-up: on CPU the Triton interpreter must be on before any kernel module is imported."""

import os
import socket

import pytest

from tests.device import TEST_DEVICE

if TEST_DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


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

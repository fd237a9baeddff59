"""export_hf of one Qwen3-MoE GPTModel at TP, PP, EP, ETP (x DP) on gloo processes: the same files, byte for
byte, as one process holding the whole model.  The weights are a function of the global parameter name,
sliced as Megatron shards them (tests/megatron_models.py), so every parallelism holds slices of one model."""

from __future__ import annotations

import os

import pytest

from tests.distributed_harness import run_ranks, values

PARALLELISMS = {  # name: (TP, PP, EP, ETP); the world is TP x PP x DP, ETP x EP x expert-DP
    "tp2": (2, 1, 1, 2),
    "pp2": (1, 2, 1, 1),
    "tp2_pp2": (2, 2, 1, 2),
    "tp2_ep2_etp1": (2, 1, 2, 1),
}


def export_at(rank: int, world: int, out: str, parallelism: tuple[int, int, int, int], layout: str) -> list[str]:
    from megatron.core import parallel_state

    import moeq_triton
    from tests.megatron_models import gpt_model, hf_config

    os.environ["TRITON_INTERPRET"] = "0"  # the CPU engine; the kernels are tested elsewhere
    tp, pp, ep, etp = parallelism
    parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    try:
        model = gpt_model(layout)
        moeq_triton.export_hf(model, out, hf_config(layout), fmt="nvfp4", max_shard_bytes=60_000)
    finally:
        parallel_state.destroy_model_parallel()
    return sorted(os.listdir(out))


def assert_same_files(files: list[str], a, b) -> None:
    assert files == sorted(os.listdir(b)) and len(files) > 4, files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    values(run_ranks(export_at, 1, str(out), (1, 1, 1, 1), "moe", timeout_s=300))
    return out


@pytest.mark.slow  # 2-4 gloo processes: 30-60 s each
@pytest.mark.parametrize("name", list(PARALLELISMS))
def test_parallel_export_equals_single_process(name, single_process, tmp_path):
    tp, pp, ep, etp = PARALLELISMS[name]
    world = tp * pp if ep * etp <= tp else ep * etp * pp
    files = values(run_ranks(export_at, world, str(tmp_path / name), PARALLELISMS[name], "moe", timeout_s=400))
    assert all(f == files[0] for f in files)
    assert_same_files(files[0], tmp_path / name, single_process)


OTHER_LAYOUTS = {  # layout: parallelisms (TP cuts of q/k/v, fc1 and proj biases; EP with expert_bias; Mixtral names)
    "llama_bias": ("tp2",),
    "shared": ("tp2",),
    "glm": ("tp2", "tp2_ep2_etp1"),
    "mixtral": ("tp2_ep2_etp1",),
}


@pytest.mark.slow  # 1 + 2 or 4 gloo processes: 30-60 s each
@pytest.mark.parametrize(
    ("layout", "name"), [(layout, name) for layout, names in OTHER_LAYOUTS.items() for name in names]
)
def test_other_layouts_at_tp_and_ep_equal_single_process(layout, name, tmp_path):
    """Linear biases (Llama), a qkv bias and a gated shared expert (Qwen2-MoE), GLM's shared experts and router
    expert_bias, Mixtral's expert names under EP: cut as Megatron cuts them, joined back, the same files as one
    process."""
    tp, pp, ep, etp = PARALLELISMS[name]
    values(run_ranks(export_at, 1, str(tmp_path / "one"), (1, 1, 1, 1), layout, timeout_s=300))
    world = tp * pp if ep * etp <= tp else ep * etp * pp
    files = values(run_ranks(export_at, world, str(tmp_path / name), PARALLELISMS[name], layout, timeout_s=400))
    assert all(f == files[0] for f in files)
    assert_same_files(files[0], tmp_path / name, tmp_path / "one")

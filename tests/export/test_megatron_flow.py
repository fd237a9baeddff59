"""The seed's flow on gloo processes: quantize with ``triton_grouped`` inside Megatron, save with Megatron's
dist_checkpointing and ModelOpt's sharded state, reload at another parallelism, export.

ModelOpt 0.47 refuses TP and EP together on SequentialMLP ("TP+EP is not supported by QuantSequentialMLP.
Set either TP or EP to 1!", checked below), and TEGroupedMLP needs Transformer Engine, which is not
installable here: the quantize step runs at TP=2 (ETP=2, EP=1), the layout it accepts.
"""

from __future__ import annotations

import os

import pytest

from tests.distributed_harness import run_ranks, values


def cpu_checkpointing_patches() -> None:
    """Test-only: ModelOpt's Megatron extra state calls ``torch.cuda.synchronize()`` (modelopt/torch/opt/
    plugins/megatron.py, ``_modelopt_get_extra_state``), which a CPU build of torch refuses with "Torch not
    compiled with CUDA enabled"; with nothing on a GPU there is nothing to wait for.  Megatron's writer
    (dist_checkpointing/strategies/filesystem_async.py) starts a multiprocessing Manager, which a daemonic
    process may not ("daemonic processes are not allowed to have children"): the worker stops being one."""
    import multiprocessing

    import torch

    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"  # the finalize step's failure flag (state_dict_saver.py)
    multiprocessing.current_process().daemon = False


def _quantize_and_save(rank: int, world: int, checkpoint: str, tp: int, ep: int) -> str:
    import modelopt.torch.quantization as mtq
    from megatron.core import dist_checkpointing, parallel_state
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    import moeq_triton
    from moeq_triton.modelopt.weight_calibration import LAST_PATH
    from tests.megatron_models import gpt_model

    os.environ["TRITON_INTERPRET"] = "0"
    cpu_checkpointing_patches()
    parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
    try:
        model = gpt_model("moe")
        try:
            mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
        except ValueError as error:
            return f"refused: {error}"
        os.makedirs(checkpoint, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), checkpoint)
        save_sharded_modelopt_state([model], checkpoint)
        return LAST_PATH.path
    finally:
        parallel_state.destroy_model_parallel()


def _reload_and_export(rank: int, world: int, checkpoint: str | None, out: str, tp: int, pp: int) -> list[str]:
    import modelopt.torch.quantization as mtq
    from megatron.core import dist_checkpointing, parallel_state
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import restore_sharded_modelopt_state

    import moeq_triton
    from tests.megatron_models import gpt_model, hf_config

    os.environ["TRITON_INTERPRET"] = "0"
    cpu_checkpointing_patches()
    parallel_state.initialize_model_parallel(tp, pp)
    try:
        if checkpoint is None:  # the reference: the original model, quantized and exported in one process
            model = gpt_model("moe")
            mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
        else:  # other weights, replaced by the checkpoint's
            model = gpt_model("moe", seed=1)
            restore_sharded_modelopt_state([model], checkpoint)
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint))
        moeq_triton.export_hf(model, out, hf_config("moe"), max_shard_bytes=60_000)
    finally:
        parallel_state.destroy_model_parallel()
    return sorted(os.listdir(out))


@pytest.mark.slow  # 4 + 2 + 2 + 1 gloo processes: about 3 min
def test_quantize_at_tp2_save_reload_at_pp2_export_equals_single_process(tmp_path):
    refused = values(run_ranks(_quantize_and_save, 4, str(tmp_path / "refused"), 2, 2, timeout_s=300))
    assert all(r.startswith("refused: TP+EP is not supported by QuantSequentialMLP") for r in refused), refused
    paths = values(run_ranks(_quantize_and_save, 2, str(tmp_path / "ckpt"), 2, 1, timeout_s=300))
    assert paths == ["whole-model"] * 2, paths  # triton_grouped's own grouped pass, not a fallback
    files = values(run_ranks(_reload_and_export, 2, str(tmp_path / "ckpt"), str(tmp_path / "pp2"), 1, 2, timeout_s=300))
    reference = values(run_ranks(_reload_and_export, 1, None, str(tmp_path / "one"), 1, 1, timeout_s=300))[0]
    assert files[0] == files[1] == reference and "hf_quant_config.json" in reference
    for name in reference:
        assert (tmp_path / "pp2" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name

"""Cross-rank amax reduction on real torch.distributed (gloo, spawned processes).

Each test spawns its ranks through distributed_harness.run_ranks, which kills them at a deadline:
a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import os

import pytest

from tests.distributed_harness import run_ranks, values

HIDDEN, FFN = 32, 16

pytestmark = pytest.mark.slow  # every test spawns gloo ranks (10-60 s each on 2 cores): the slow tier


def _count_all_reduce():
    """Wrap torch.distributed.all_reduce; returns the list the calls are appended to."""
    import torch.distributed as dist

    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    return calls


def _split_moe(rank: int, world: int, tp: int, layers: int, experts: int, mode: str, megatron: bool = False) -> dict:
    """Experts split over EP = world / tp ranks, each expert's weight split over tp ranks.

    Every rank generates the same full weights, keeps its slice, and checks that each
    quantizer ends with the amax of the full weight (per expert) or of all experts (shared).
    megatron=True takes the groups and ranks from Megatron's initialized parallel_state (expert
    data / tensor / model parallel, as ModelOpt's TEGroupedMLP plugin hands them to the experts).
    """
    import modelopt.torch.quantization as mtq
    import torch
    import torch.distributed as dist
    from modelopt.torch.utils.distributed import ParallelState

    import moeq_triton
    from tests.grouped_linear_standin import GroupedMoEStandIn, QuantGroupedLinearStandIn

    ep = world // tp
    if megatron:
        from megatron.core import parallel_state as mcore

        tp_rank, ep_rank = mcore.get_expert_tensor_parallel_rank(), mcore.get_expert_model_parallel_rank()
        QuantGroupedLinearStandIn.parallel_state_factory = lambda: ParallelState(
            mcore.get_expert_data_parallel_group(),
            mcore.get_expert_tensor_parallel_group(),
            mcore.get_expert_model_parallel_group(),
        )
    else:
        tp_rank, ep_rank = rank % tp, rank // tp
        tp_groups = [dist.new_group([e * tp + t for t in range(tp)]) for e in range(ep)]  # all ranks create all
        ep_groups = [dist.new_group([e * tp + t for e in range(ep)]) for t in range(tp)]
        my_tp, my_ep = tp_groups[ep_rank], ep_groups[tp_rank]
        QuantGroupedLinearStandIn.parallel_state_factory = lambda: ParallelState(-1, my_tp, my_ep)

    local = experts // ep
    model = GroupedMoEStandIn(layers, local, hidden=HIDDEN, ffn=FFN, tensor_parallel=tp).to(torch.bfloat16)
    model.head = torch.nn.Linear(HIDDEN, HIDDEN, bias=False).to(torch.bfloat16)  # replicated: world group
    gen = torch.Generator().manual_seed(1234)
    expected: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(HIDDEN, HIDDEN, generator=gen))
        expected["head.weight_quantizer"] = model.head.weight.abs().amax()
        for index, layer in enumerate(model.layers):
            for name, shape, dim in (("linear_fc1", (2 * FFN, HIDDEN), 0), ("linear_fc2", (HIDDEN, FFN), 1)):
                full = [((torch.randn(shape, generator=gen) ** 3) * (1 + e)).to(torch.bfloat16) for e in range(experts)]
                linear = getattr(layer.mlp.experts, name)
                prefix = f"layers.{index}.mlp.experts.{name}.weight_quantizer"
                for i in range(local):
                    e = ep_rank * local + i
                    getattr(linear, f"weight{i}").copy_(full[e].chunk(tp, dim=dim)[tp_rank])
                    per_expert = full[e].abs().amax()
                    everyone = torch.stack([w.abs().amax() for w in full]).amax()
                    expected[f"{prefix}.{i}"] = everyone if mode == "shared" else per_expert

    cfg = moeq_triton.NVFP4_WEIGHT_ONLY_CFG
    if mode == "shared":
        cfg = {**cfg, "quant_cfg": [dict(e) for e in cfg["quant_cfg"]]}
        for entry in cfg["quant_cfg"]:
            if "cfg" in entry and entry["cfg"].get("calibrator") == moeq_triton.CALIBRATOR:
                entry["cfg"] = {**entry["cfg"], "calibrator": moeq_triton.CALIBRATOR_SHARED}
    calls = _count_all_reduce()
    mtq.quantize(model, cfg)
    from moeq_triton.modelopt.weight_calibration import LAST_PATH

    quantizers = dict(model.named_modules())
    wrong = [
        f"{name}: {quantizers[name].amax.item()} != {value.item()}"
        for name, value in expected.items()
        if not (quantizers[name].amax.dtype == value.dtype and torch.equal(quantizers[name].amax, value))
    ]
    return {"wrong": wrong, "collectives": len(calls), "checked": len(expected), "path": LAST_PATH.path}


def _expected_collectives(world: int, tp: int, mode: str) -> int:
    """One layout check + one all_reduce per distinct group (by member ranks) that carries values."""
    ep = world // tp
    groups = {tuple(range(world))}  # the replicated head (the world group)
    if tp > 1:
        groups.add(tuple(range(tp)))  # rank 0's tensor-parallel group
    if mode == "shared" and ep > 1:
        groups.add(tuple(e * tp for e in range(ep)))  # rank 0's expert-parallel group
    return 1 + len(groups)


@pytest.mark.parametrize("mode", ["per-expert", "shared"])
@pytest.mark.parametrize(("world", "tp"), [(2, 1), (2, 2), (4, 2)])
def test_split_experts_match_whole_model_amax(world, tp, mode):
    """Every rank ends with the single-process amax of the whole (unsplit) model, bitwise."""
    results = values(run_ranks(_split_moe, world, tp, 2, 4, mode))
    for rank, result in enumerate(results):
        assert result["checked"] > 1
        assert result["path"] == "whole-model", result
        assert result["wrong"] == [], f"rank {rank}: {result['wrong'][:4]}"
        assert result["collectives"] == _expected_collectives(world, tp, mode), result


def test_collectives_do_not_grow_with_layers_or_experts():
    """2 layers x 4 experts and 16 layers x 64 experts: the same number of collectives."""
    small = values(run_ranks(_split_moe, 2, 2, 2, 4, "per-expert"))
    large = values(run_ranks(_split_moe, 2, 2, 16, 64, "per-expert"))
    assert [r["wrong"] for r in small + large] == [[], [], [], []]
    expected = _expected_collectives(2, 2, "per-expert")
    assert {r["collectives"] for r in small} == {r["collectives"] for r in large} == {expected}


def _uneven(rank: int, world: int, case: str) -> dict:
    """Rank 0 holds routed experts (EP over the world); rank 1 holds none, or an extra module."""
    import modelopt.torch.quantization as mtq
    import torch
    import torch.distributed as dist
    from modelopt.torch.utils.distributed import ParallelState

    import moeq_triton
    from tests.grouped_linear_standin import GroupedMoEStandIn, QuantGroupedLinearStandIn

    QuantGroupedLinearStandIn.parallel_state_factory = lambda: ParallelState(-1, -1, dist.group.WORLD)
    model = GroupedMoEStandIn(1, 2) if rank == 0 else torch.nn.Module()
    model.head = torch.nn.Linear(8, 8, bias=False)
    if case == "mismatch" and rank == 1:
        model.extra = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        model.head.weight.fill_(0.5 + rank)  # replicas that differ: the world max must win
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    return {"head": model.head.weight_quantizer.amax.item()}


def test_rank_with_zero_local_experts_completes():
    results = values(run_ranks(_uneven, 2, "zero-experts"))
    assert [r["head"] for r in results] == [1.5, 1.5]


def test_mismatched_quantizer_sets_fail_on_every_rank():
    """No hang, and every rank gets the same clear error."""
    results = run_ranks(_uneven, 2, "mismatch", timeout_s=180)
    for status, value in results:
        assert status == "error"
        assert "disagree about which amaxes to reduce" in value, value


def _megatron(rank: int, world: int) -> dict:
    """Real Megatron parallel_state (TP 2, EP 2 on 4 ranks) with megatron-core modules.

    ModelOpt refuses TP and EP together on SequentialMLP, so the experts here are the TE-contract
    stand-in holding Megatron's expert groups (checked against the whole weights), and the
    dense part is a real megatron-core GPTModel with TP 2 (checked against ModelOpt's own max and sync).
    """
    import modelopt.torch.quantization as mtq
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    import moeq_triton

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=2)
    experts = _split_moe(rank, world, 2, 2, 4, "per-expert", megatron=True)
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=128, gated_linear_unit=True, normalization="RMSNorm", qk_layernorm=True,
        add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.bfloat16, bf16=True,
        tensor_model_parallel_size=2,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")

    def build() -> GPTModel:
        model = GPTModel(config, spec, vocab_size=128, max_sequence_length=32).to(torch.bfloat16)
        gen = torch.Generator().manual_seed(rank)  # every rank's slice differs: reductions must really happen
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((torch.randn(p.shape, generator=gen) ** 3).to(p.dtype))
        return model

    from moeq_triton.modelopt.weight_calibration import LAST_PATH
    from tests.calibration_models import assert_same_modelopt_state, assert_same_quantizer_attributes, with_calibrator

    ours, theirs = build(), build()
    calls = _count_all_reduce()
    mtq.quantize(ours, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    ours_collectives = len(calls)
    path = LAST_PATH.path
    mtq.quantize(theirs, with_calibrator(moeq_triton.NVFP4_WEIGHT_ONLY_CFG, "max"))
    a = {n: b for n, b in ours.named_buffers() if n.endswith("_amax")}
    b = {n: b for n, b in theirs.named_buffers() if n.endswith("_amax")}
    wrong = [n for n in a if not (n in b and a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]))]
    assert_same_quantizer_attributes(ours, theirs)
    assert_same_modelopt_state(ours, theirs, moeq_triton.CALIBRATOR)
    parallel_state.destroy_model_parallel()
    return {
        "experts": experts,
        "wrong": wrong,
        "same_keys": a.keys() == b.keys() and len(a) > 4,
        "ours": ours_collectives,
        "path": path,
        "theirs": len(calls) - ours_collectives,
    }


def test_real_megatron_tensor_and_expert_parallel():
    results = values(run_ranks(_megatron, 4, timeout_s=400))
    for rank, result in enumerate(results):
        assert result["experts"]["wrong"] == [], f"rank {rank}: {result['experts']['wrong'][:4]}"
        assert result["experts"]["checked"] > 1
        assert result["same_keys"], result
        assert result["wrong"] == [], f"rank {rank}: {result['wrong'][:4]}"
        assert result["ours"] < result["theirs"], result
        assert result["path"] == "whole-model", result
    print("collectives per rank, ours vs ModelOpt max:", [(r["ours"], r["theirs"]) for r in results])


# ---------------------------------------------------------------- the one rank-agreement helper


def _agreement_steps(rank: int, world: int, rules: str) -> dict:
    """Every step of collectives' helper, under gloo or under NCCL's rule (CPU tensors rejected)."""
    import contextlib

    import torch
    import torch.distributed as dist

    from moeq_triton import distributed
    from tests.pretend_nccl import NCCLRejectsCPUTensor, pretend_nccl

    result: dict = {}
    with pretend_nccl() if rules == "nccl" else contextlib.nullcontext():
        try:  # the stand-in is really in force: a CPU tensor handed to a collective fails
            dist.all_reduce(torch.ones(1))
            result["cpu_tensor_accepted"] = True
        except NCCLRejectsCPUTensor:
            result["cpu_tensor_accepted"] = False
        result["device"] = distributed.device_for().type

        def fail_on_rank_1() -> None:
            if rank == 1:
                raise ValueError("injected on rank 1")

        failure = distributed.agree(fail_on_rank_1, "testing agreement")
        result["failure"] = f"{type(failure).__name__}: {failure}"
        result["success"] = distributed.agree(lambda: None, "testing agreement")
        payload = torch.tensor([1.5, float("nan"), -0.0, float("inf")]) * (rank + 1)
        if rank == 1:
            distributed.send_bytes(payload, dst=0)
        else:
            received = distributed.recv_bytes(payload.numel() * 4, src=1)
            result["received"] = received.view(torch.float32).view(torch.int32).tolist()
            result["received_on"] = received.device.type
        result["objects"] = distributed.gather_objects({"rank": rank})
        item = distributed.SyncItem("x", torch.tensor([float(rank), 1.0 - rank]), [(distributed.DATA, None)])
        result["collectives"] = distributed.max_reduce([item])
        result["reduced"] = item.value.tolist()
        distributed.barrier()
    return result


@pytest.mark.parametrize("rules", ["gloo", "nccl"])
def test_agreement_helper_on_gloo_and_under_nccl_rules(rules):
    """Each rank-agreement step gives the same answer under gloo and under NCCL's rule that collectives take
    CUDA tensors only (tests/pretend_nccl.py): the device comes from the backend, every time."""
    import torch

    results = values(run_ranks(_agreement_steps, 2, rules, timeout_s=180))
    two = torch.tensor([1.5, float("nan"), -0.0, float("inf")]) * 2
    for result in results:
        assert result["cpu_tensor_accepted"] == (rules == "gloo")
        assert result["device"] == ("cuda" if rules == "nccl" else "cpu")
        assert result["success"] is None
        assert result["objects"] == [{"rank": 0}, {"rank": 1}]
        assert result["collectives"] == 2 and result["reduced"] == [1.0, 1.0]
    assert results[0]["failure"] == "PeerFailure: rank 1 failed while testing agreement"
    assert results[1]["failure"] == "ValueError: injected on rank 1"
    assert results[0]["received"] == two.view(torch.int32).tolist() and results[0]["received_on"] == "cpu"


def _expert_parallel_export(rank: int, world: int, out: str, rules: str) -> list[str]:
    import contextlib
    import os

    from megatron.core import parallel_state

    import moeq_triton
    from tests.megatron_models import gpt_moe, hf_config
    from tests.pretend_nccl import pretend_nccl

    os.environ["TRITON_INTERPRET"] = "0"
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    try:
        model = gpt_moe()
        with pretend_nccl() if rules == "nccl" else contextlib.nullcontext():
            moeq_triton.export_hf(model, out, hf_config(), fmt="nvfp4", max_shard_bytes=40_000)
    finally:
        parallel_state.destroy_model_parallel()
    return sorted(os.listdir(out))


def test_expert_parallel_export_under_nccl_rules(tmp_path):
    """EP=2 export (gather of names, per-shard agreement, send/recv of bytes to rank 0) under NCCL's rule
    writes the same files, byte for byte, as one process."""
    reference, two = tmp_path / "one", tmp_path / "two"
    values(run_ranks(_expert_parallel_export, 1, str(reference), "gloo", timeout_s=300))
    files = values(run_ranks(_expert_parallel_export, 2, str(two), "nccl", timeout_s=300))
    assert files[0] == sorted(os.listdir(reference)) and len(files[0]) > 4
    for name in files[0]:
        assert (two / name).read_bytes() == (reference / name).read_bytes(), name


def _fsdp2(rank: int, world: int) -> dict:
    """A transformers Qwen3-MoE sharded with FSDP2 (fully_shard per decoder layer and at the root)."""
    import modelopt.torch.quantization as mtq
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import moeq_triton
    from moeq_triton.modelopt.weight_calibration import LAST_PATH
    from tests.calibration_models import amax_buffers, tiny_qwen3_moe

    reference = tiny_qwen3_moe()  # unsharded, every rank the same (seeded)
    mtq.quantize(reference, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    expected = {n: b.clone() for n, b in amax_buffers(reference).items()}
    mesh = init_device_mesh("cpu", (world,))
    model = tiny_qwen3_moe()
    model = mtq.quantize(model, {**moeq_triton.NVFP4_WEIGHT_ONLY_CFG, "algorithm": None})  # quantizers only
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mtq.calibrate(model, algorithm="max")
    got = amax_buffers(model)
    wrong = [n for n in expected if not (n in got and torch.equal(got[n], expected[n]))]
    return {"path": LAST_PATH.path, "reason": LAST_PATH.reason, "wrong": wrong, "checked": len(expected)}


def test_fsdp2_hook_falls_back_to_modelopts_weight_access_with_max_amaxes():
    """An FSDP2-wrapped model is detected: ModelOpt's max_calibrate opens its weight-access context per
    module (our grouped weight pass inside) and every amax equals the unsharded model's."""
    results = values(run_ranks(_fsdp2, 2, timeout_s=300))
    for result in results:
        assert result["path"] == "modelopt" and "FSDP2" in result["reason"], result
        assert result["checked"] > 4 and result["wrong"] == [], result

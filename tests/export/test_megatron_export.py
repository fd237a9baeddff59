"""export_hf of a real megatron-core GPTModel (Qwen3-MoE layout): names, scales, values, logits, ranks."""

from __future__ import annotations

import os
import re

import modelopt.torch.quantization as mtq
import pytest
import torch

import moeq_triton
from moeq_triton.checkpoint.formats import FORMATS, dequantize
from moeq_triton.kernels import dequantize_nvfp4_reference, grouped_amax, quantize_nvfp4_reference
from tests.assertions import assert_bitwise_equal, checkpoint_tensors
from tests.distributed_harness import run_ranks, values
from tests.grouped_linear_standin import GroupedLinearStandIn
from tests.megatron_models import EXPERTS, HIDDEN, LAYERS, MOE_FFN, VOCAB, gpt_moe, hf_config


@pytest.mark.slow  # about 19 s: a Megatron model, quantize, export
def test_every_expert_exported_with_names_shapes_scales_and_values(megatron_world, tmp_path):
    model = gpt_moe()
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    moeq_triton.export_hf(model, tmp_path / "out", hf_config())
    stored = checkpoint_tensors(tmp_path / "out")
    fmt = FORMATS["nvfp4"]
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            fc1 = model.decoder.layers[layer].mlp.experts.local_experts[e].linear_fc1.weight.detach()
            fc2 = model.decoder.layers[layer].mlp.experts.local_experts[e].linear_fc2.weight.detach()
            gate, up = fc1.chunk(2)
            assert stored[f"{prefix}.gate_proj.weight"].shape == (MOE_FFN, HIDDEN // 2)
            assert stored[f"{prefix}.gate_proj.weight_scale"].dtype == torch.float8_e4m3fn
            assert stored[f"{prefix}.down_proj.weight"].shape == (HIDDEN, MOE_FFN // 2)
            assert_bitwise_equal(
                stored[f"{prefix}.gate_proj.weight_scale_2"], stored[f"{prefix}.up_proj.weight_scale_2"], "gate/up"
            )
            shared = grouped_amax([fc1])[0]  # gate and up share the amax of the fused fc1
            for proj, w, amax in (("gate_proj", gate, shared), ("up_proj", up, shared), ("down_proj", fc2, None)):
                amax = grouped_amax([w])[0] if amax is None else amax
                expected = quantize_nvfp4_reference(w, amax)
                name = f"{prefix}.{proj}.weight"
                assert_bitwise_equal(dequantize(stored, name, fmt), dequantize_nvfp4_reference(expected), name)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate.weight", "lm_head.weight"):
        assert any(k.startswith(name) for k in stored), name
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # the router stays unquantized


@pytest.mark.slow  # about 30 s
def test_grouped_experts_export_the_same_bytes(megatron_world, tmp_path):
    """TEGroupedMLP spelling (linear_fc1.weight{e}, the TE-contract stand-in) == SequentialMLP's export."""
    sequential = gpt_moe()
    grouped = gpt_moe()
    for layer in grouped.decoder.layers:
        experts = layer.mlp.experts.local_experts
        holder = torch.nn.Module()
        holder.linear_fc1 = GroupedLinearStandIn(EXPERTS, HIDDEN, 2 * MOE_FFN)
        holder.linear_fc2 = GroupedLinearStandIn(EXPERTS, MOE_FFN, HIDDEN)
        with torch.no_grad():
            for e in range(EXPERTS):
                getattr(holder.linear_fc1, f"weight{e}").copy_(experts[e].linear_fc1.weight)
                getattr(holder.linear_fc2, f"weight{e}").copy_(experts[e].linear_fc2.weight)
        layer.mlp.experts = holder.to(torch.bfloat16)
    assert any(re.search(r"experts\.linear_fc1\.weight3$", n) for n, _ in grouped.named_parameters())
    for model, name in ((sequential, "seq"), (grouped, "grouped")):
        moeq_triton.export_hf(model, tmp_path / name, hf_config(), fmt="nvfp4")
    a, b = checkpoint_tensors(tmp_path / "seq"), checkpoint_tensors(tmp_path / "grouped")
    assert sorted(a) == sorted(b)
    for name in a:
        assert_bitwise_equal(b[name], a[name], name)


def megatron_cpu_forward_patches(monkeypatch) -> None:
    """Test-only patches that let Megatron's GPTModel run forward on CPU: megatron-core 0.16 asks
    ``torch.cuda.current_device()`` and, without Transformer Engine, reaches an undefined ``te_general_gemm``."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def test_unquantized_export_gives_megatron_logits_in_transformers(megatron_world, tmp_path, monkeypatch):
    """The name and layout mapping, proven by logits: export fp32, load Qwen3MoeForCausalLM, same tokens."""
    from transformers import Qwen3MoeForCausalLM

    megatron_cpu_forward_patches(monkeypatch)
    model = gpt_moe(torch.float32).eval()
    moeq_triton.export_hf(model, tmp_path / "plain", hf_config(), fmt=None)
    hf = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(1, 1, 12, 12, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        ours = model(tokens, torch.arange(12)[None], mask)[..., :VOCAB]  # Megatron's padded vocabulary cut
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, diff


def _export_with_ranks(rank: int, world: int, out: str) -> list[str]:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    try:
        model = gpt_moe()
        mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
        moeq_triton.export_hf(model, out, hf_config(), max_shard_bytes=40_000)
    finally:
        parallel_state.destroy_model_parallel()
    return sorted(os.listdir(out))


@pytest.mark.slow  # two spawned ranks: about 45 s
def test_expert_parallel_export_equals_single_process(tmp_path):
    """EP=2 on 2 gloo ranks (each holds half the experts) writes the same files, byte for byte, as 1 rank."""
    reference = tmp_path / "one"
    values(run_ranks(_export_with_ranks, 1, str(reference), timeout_s=300))
    files = values(run_ranks(_export_with_ranks, 2, str(tmp_path / "two"), timeout_s=300))
    assert files[0] == sorted(os.listdir(reference)) and len(files[0]) > 4
    for name in files[0]:
        assert (tmp_path / "two" / name).read_bytes() == (reference / name).read_bytes(), name


def _export_failing_on_rank1(rank: int, world: int, out: str) -> str:
    from megatron.core import parallel_state

    from moeq_triton.checkpoint import job

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    try:
        model = gpt_moe()
        if rank == 1:

            def broken(*args, **kwargs):
                raise MemoryError("injected on rank 1")

            job.quantize_units = broken
        moeq_triton.export_hf(model, out, hf_config(), fmt="nvfp4", max_shard_bytes=40_000)
    except Exception as error:  # the test wants every rank's outcome
        return f"{type(error).__name__}: {error}"
    finally:
        parallel_state.destroy_model_parallel()
    return "no error"


@pytest.mark.slow  # two spawned ranks: about 25 s
def test_failure_on_one_rank_fails_every_rank_and_leaves_nothing(tmp_path):
    results = values(run_ranks(_export_failing_on_rank1, 2, str(tmp_path / "out"), timeout_s=300))
    assert results[1] == "MemoryError: injected on rank 1"
    assert results[0].startswith("PeerFailure: rank 1 failed"), results[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

"""Megatron layouts beyond Qwen3-MoE: a dense GPTModel, a shared-expert MoE (gated, Qwen2-MoE spelling) and a
dense-first MoE export to the same files as ``moeq-triton quantize`` of the same weights written in HF layout;
the HF layout itself is proven by transformers' logits."""

from __future__ import annotations

import pytest
import torch

import moeq_triton
from moeq_triton.checkpoint.io import CheckpointError
from moeq_triton.cli import main
from moeq_triton.naming import megatron
from tests.assertions import checkpoint_tensors
from tests.export.test_megatron_export import megatron_cpu_forward_patches
from tests.megatron_models import VOCAB, gpt_model, hf_config

ARCHITECTURE = {
    "dense": "Qwen3ForCausalLM",
    "tied": "Qwen3ForCausalLM",
    "shared": "Qwen2MoeForCausalLM",
    "dense_first": "Qwen3MoeForCausalLM",
}


def assert_same_files(a, b) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "hf_quant_config.json" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow  # about 25 s per layout
@pytest.mark.parametrize("layout", list(ARCHITECTURE))
def test_export_equals_model_free_quantize_of_the_hf_layout(layout, megatron_world, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU engine; the kernels are tested elsewhere
    model = gpt_model(layout)
    moeq_triton.export_hf(model, tmp_path / "plain", hf_config(layout), fmt=None)
    plain = checkpoint_tensors(tmp_path / "plain")
    assert plain["model.embed_tokens.weight"].shape[0] == VOCAB  # Megatron's padding rows dropped
    assert ("lm_head.weight" in plain) == (layout != "tied")
    if layout == "shared":
        assert "model.layers.1.mlp.shared_expert_gate.weight" in plain
        assert "model.layers.0.self_attn.q_proj.bias" in plain
    if layout == "dense_first":
        assert "model.layers.0.mlp.gate_proj.weight" in plain and "model.layers.1.mlp.experts.3.up_proj.weight" in plain
    for fmt in ("nvfp4", "fp8"):
        moeq_triton.export_hf(model, tmp_path / f"export-{fmt}", hf_config(layout), fmt=fmt)
        args = ["quantize", "--model", str(tmp_path / "plain"), "--out", str(tmp_path / f"cli-{fmt}")]
        assert main([*args, "--format", fmt, "--device", "cpu"]) == 0
        assert_same_files(tmp_path / f"export-{fmt}", tmp_path / f"cli-{fmt}")


@pytest.mark.slow  # about 15 s per layout
@pytest.mark.parametrize("layout", list(ARCHITECTURE))
def test_hf_layout_gives_megatron_logits_in_transformers(layout, megatron_world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    megatron_cpu_forward_patches(monkeypatch)
    model = gpt_model(layout, torch.float32).eval()
    moeq_triton.export_hf(model, tmp_path / "plain", hf_config(layout), fmt=None)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    assert type(hf).__name__ == ARCHITECTURE[layout]
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(1, 1, 12, 12, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        ours = model(tokens, torch.arange(12)[None], mask)[..., :VOCAB]
        theirs = hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, diff


def test_spellings_of_router_bias_mixtral_experts_and_grouped_weights():
    layer_of = {0: 5}
    glm = megatron.hf_names("decoder.layers.0.mlp.router.expert_bias", "GLM-4.5 / 4.6 / 4.7", layer_of=layer_of)
    assert glm.names == ("model.layers.5.mlp.gate.e_score_correction_bias",)
    shared = megatron.hf_names(
        "decoder.layers.0.mlp.shared_experts.linear_fc1.weight", "GLM-4.5 / 4.6 / 4.7", layer_of=layer_of
    )
    assert shared == megatron.Mapped(
        megatron.GLU,
        ("model.layers.5.mlp.shared_experts.gate_proj.weight", "model.layers.5.mlp.shared_experts.up_proj.weight"),
    )
    mixtral = megatron.hf_names(
        "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight", "Mixtral", layer_of=layer_of, first_expert=4
    )
    assert mixtral.names == (
        "model.layers.5.block_sparse_moe.experts.5.w1.weight", "model.layers.5.block_sparse_moe.experts.5.w3.weight"
    )  # fmt: skip
    te = megatron.hf_names("decoder.layers.0.mlp.experts.linear_fc2.weight3", "Qwen3-MoE", layer_of=layer_of)
    assert te == megatron.Mapped(megatron.ROW, ("model.layers.5.mlp.experts.3.down_proj.weight",), 3)
    grouped = megatron.hf_names("decoder.layers.0.mlp.experts.weight1", "Qwen3-MoE", layer_of=layer_of)
    assert grouped.cut == megatron.GROUPED_FC1
    with pytest.raises(megatron.UnmappedParameter, match="q_layernorm.* no Mixtral counterpart.*supported: Qwen3"):
        megatron.hf_names("decoder.layers.0.self_attention.q_layernorm.weight", "Mixtral", layer_of=layer_of)
    with pytest.raises(megatron.UnmappedParameter, match="has no Megatron layout here; supported"):
        megatron.hf_names("output_layer.weight", "Llama-4 Scout / Maverick", layer_of=layer_of)


def test_a_dense_model_exported_as_a_moe_family_names_the_parameter(megatron_world, tmp_path):
    unmapped = r"mlp\.shared_experts\.\S+ has no Qwen3-MoE counterpart \(the family has no shared"
    with pytest.raises(CheckpointError, match=unmapped):
        moeq_triton.export_hf(gpt_model("shared"), tmp_path / "x", hf_config("moe"), fmt=None)

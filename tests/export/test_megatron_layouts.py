"""Megatron layouts beyond Qwen3-MoE: a dense GPTModel (Qwen3; Llama with every linear bias), a shared-expert MoE
(gated, Qwen2-MoE spelling), a dense-first MoE, GLM-4.5 (shared experts, router ``expert_bias``) and Mixtral export to
the same files as ``moeq-triton quantize`` of the same weights written in HF layout; the HF layout itself is proven
by transformers' logits.  Biases the HF config does not give the model (or gives it, but Megatron lacks) are refused."""

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
    "llama_bias": "LlamaForCausalLM",
    "glm": "Glm4MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
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
    if layout == "llama_bias":
        for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"model.layers.1.{proj}.bias" in plain, proj
    if layout == "glm":
        assert (
            "model.layers.0.mlp.gate_proj.weight" in plain
            and "model.layers.1.mlp.shared_experts.up_proj.weight" in plain
        )
        assert "model.layers.1.self_attn.k_proj.bias" in plain and "model.layers.1.self_attn.o_proj.bias" not in plain
    if layout == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in plain
        assert "model.layers.1.block_sparse_moe.gate.weight" in plain
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


def test_router_expert_bias_is_glm_e_score_correction_bias_in_float32(megatron_world, tmp_path):
    """transformers holds ``e_score_correction_bias`` in float32 (``_keep_in_fp32_modules_strict``); Megatron keeps
    ``expert_bias`` in float32 too, even in a bf16 model: the export writes it so, values unchanged, and the
    command keeps it (not quantized, not in the scale files)."""
    model = gpt_model("glm")
    bias = model.decoder.layers[1].mlp.router.expert_bias
    assert bias.dtype == torch.float32 and bias.abs().min() > 0
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    moeq_triton.export_hf(model, tmp_path / "nvfp4", hf_config("glm"), fmt="nvfp4")
    stored = checkpoint_tensors(tmp_path / "nvfp4")
    assert stored[name].dtype == torch.float32 and torch.equal(stored[name], bias)
    assert not any(k.startswith(name) and k != name for k in stored)  # no scale beside it
    assert stored["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.uint8  # the experts are quantized
    model.to(torch.bfloat16)  # a bf16 copy of the buffer (Megatron restores float32 on its next forward)
    moeq_triton.export_hf(model, tmp_path / "plain", hf_config("glm"), fmt=None)
    assert checkpoint_tensors(tmp_path / "plain")[name].dtype == torch.float32


def test_biases_must_agree_with_the_hf_config(megatron_world, tmp_path):
    """A qkv bias the HF config does not give the model is refused (engines would find unexpected keys or drop
    them), and so is one the config gives but Megatron lacks (transformers would initialise it at random)."""
    no_qkv_bias = hf_config("shared")
    no_qkv_bias.qkv_bias = False
    with pytest.raises(CheckpointError, match=r"linear_qkv\.bias has no Qwen2-MoE counterpart: the HF config has "
                                               r"qkv_bias=false$"):  # fmt: skip
        moeq_triton.export_hf(gpt_model("shared"), tmp_path / "x", no_qkv_bias, fmt=None)
    llama = hf_config("llama_bias")
    llama.mlp_bias = False
    with pytest.raises(CheckpointError, match=r"mlp\.linear_fc1\.bias has no Llama \(dense\) counterpart: the HF "
                                               r"config has mlp_bias=false$"):  # fmt: skip
        moeq_triton.export_hf(gpt_model("llama_bias"), tmp_path / "x", llama, fmt=None)
    biased = hf_config("dense")
    biased.attention_bias = True
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.0\.self_attention\.linear_proj\.bias is missing: "
                                               r"the HF config has attention_bias=true"):  # fmt: skip
        moeq_triton.export_hf(gpt_model("dense"), tmp_path / "x", biased, fmt=None)
    assert not list(tmp_path.iterdir())
    from transformers import Qwen2MoeConfig  # a config.json without qkv_bias: transformers' default applies

    assert megatron.family_has_bias("Qwen2-MoE", "qkv", {"model_type": "qwen2_moe"})[0] == Qwen2MoeConfig().qkv_bias


def test_moe_with_linear_biases_is_refused_at_the_router_bias(megatron_world, tmp_path):
    """megatron-core builds SequentialMLP experts with biases (``add_bias_linear``; GroupedMLP asserts "bias not
    supported in Grouped GEMM"), but the router then has a bias too, and no mapped family has a router or expert
    bias (gpt-oss has both, stacked: not mapped)."""
    config = hf_config("moe")
    config.attention_bias = True
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.0\.mlp\.router\.bias has no Qwen3-MoE counterpart"):
        moeq_triton.export_hf(gpt_model("moe_bias"), tmp_path / "x", config, fmt=None)
    expert_bias = "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.bias"
    with pytest.raises(megatron.UnmappedParameter, match="no Qwen3-MoE counterpart: the Qwen3-MoE HF model has no mlp"):
        megatron.hf_names(expert_bias, "Qwen3-MoE", layer_of={0: 0}, config={"attention_bias": True})


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


def test_a_model_exported_as_another_family_names_the_parameter(megatron_world, tmp_path):
    with pytest.raises(CheckpointError, match=r"linear_qkv\.bias has no Qwen3-MoE counterpart: the HF config has "):
        moeq_triton.export_hf(gpt_model("shared"), tmp_path / "x", hf_config("moe"), fmt=None)
    unmapped = (
        r"mlp\.shared_experts\.gate_weight has no GLM-4\.5 / 4\.6 / 4\.7 counterpart \(the family has no shared_gate\)"
    )
    with pytest.raises(CheckpointError, match=unmapped):
        moeq_triton.export_hf(gpt_model("shared"), tmp_path / "x", hf_config("glm"), fmt=None)
    unmapped = (
        r"decoder\.layers\.1\.mlp\.router\.expert_bias has no Qwen2-MoE counterpart \(the family has no router_bias\)"
    )
    with pytest.raises(CheckpointError, match=unmapped):
        moeq_triton.export_hf(gpt_model("glm"), tmp_path / "x", hf_config("shared"), fmt=None)

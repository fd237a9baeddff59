"""transformers as a real client of our fp8-block output: what it loads, and where its FP8 loader goes wrong.

On a machine without a GPU transformers dequantizes an FP8 checkpoint to bf16 while loading. For a checkpoint
whose quantized dimensions are multiples of 128 every weight it holds must equal the format's definition
(e4m3 code x its 128x128 block's ``weight_scale_inv`` in float32, rounded once to bf16) bit for bit, with no
missing or unexpected key. Its loader infers the block size from the shapes, so other dimensions load wrongly:
the last two tests pin that behaviour (observed with transformers 5.24 and 5.25), so that the README's warning is
revisited when a release fixes it.
"""

from __future__ import annotations

import re

import pytest
import torch

from moeq_triton.checkpoint.formats import FORMATS
from moeq_triton.checkpoint.quantize import quantize_checkpoint
from moeq_triton.kernels import dequantize_fp8_block_reference
from tests.assertions import checkpoint_tensors

EXPERTS = 4


def _qwen3_moe(path, rows: int) -> None:
    """A Qwen3-MoE whose dense and expert intermediate size is ``rows`` (attention rows are multiples of 128)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        hidden_size=256, intermediate_size=rows, moe_intermediate_size=rows, num_experts=EXPERTS,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        vocab_size=256, tie_word_embeddings=False,
    )  # fmt: skip
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def _load(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.bfloat16)
    return dict(model.named_parameters()), info


def _expected(path) -> dict[str, torch.Tensor]:
    """Every quantized weight as the format defines its value, under the name transformers holds it by
    (an expert's gate/up/down stacked per layer as ``experts.gate_up_proj`` / ``experts.down_proj``)."""
    tensors = checkpoint_tensors(path)
    value = {
        name: dequantize_fp8_block_reference(t, tensors[name + "_scale_inv"])
        for name, t in tensors.items()
        if t.dtype == torch.float8_e4m3fn
    }
    expected = {n: v for n, v in value.items() if ".experts." not in n}
    for layer in sorted({int(m.group(1)) for n in value if (m := re.match(r"model\.layers\.(\d+)\.mlp\.experts", n))}):
        pre = f"model.layers.{layer}.mlp.experts."
        gate, up, down = (
            [value[f"{pre}{e}.{p}.weight"] for e in range(EXPERTS)] for p in ("gate_proj", "up_proj", "down_proj")
        )
        expected[pre + "gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(gate, up)])
        expected[pre + "down_proj"] = torch.stack(down)
    return expected


def _differing(params, expected) -> list[str]:
    return [
        n for n, v in expected.items() if not torch.equal(params[n].detach().view(torch.int16), v.view(torch.int16))
    ]


@pytest.mark.slow  # two tiny models through our command and transformers' FP8 loader: about 20 s
def test_transformers_loads_fp8_block_output_bit_exact(tmp_path):
    _qwen3_moe(tmp_path / "src", rows=256)
    quantize_checkpoint(tmp_path / "src", tmp_path / "out", FORMATS["fp8-block"])
    params, info = _load(tmp_path / "out")
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    expected = _expected(tmp_path / "out")
    assert len(expected) == 2 * 4 + 2 * 2  # q/k/v/o per layer, gate_up and down per layer
    assert _differing(params, expected) == []


@pytest.mark.slow
def test_transformers_fp8_loader_misreads_rows_not_multiple_of_128(tmp_path):
    """192-row experts (dims the engines refuse too; the command warns): transformers loads them without a
    word, with values that are not the checkpoint's. When this fails, transformers fixed it: update the README."""
    _qwen3_moe(tmp_path / "src", rows=192)
    quantize_checkpoint(tmp_path / "src", tmp_path / "out", FORMATS["fp8-block"])
    params, info = _load(tmp_path / "out")
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    differing = _differing(params, _expected(tmp_path / "out"))
    assert differing and all(".experts." in n for n in differing), differing


@pytest.mark.slow
def test_transformers_fp8_loader_refuses_deepseek_kv_a_proj(tmp_path, capfd, caplog):
    """DeepSeek-V3's kv_a_proj_with_mqa has kv_lora_rank + rope dim = 576 rows: transformers' loader raises."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        hidden_size=256, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
        v_head_dim=64, vocab_size=256, n_group=1, topk_group=1, tie_word_embeddings=False,
    )  # fmt: skip
    DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    quantize_checkpoint(tmp_path / "src", tmp_path / "out", FORMATS["fp8-block"])
    with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
        _load(tmp_path / "out")
    report = "".join(capfd.readouterr()) + caplog.text  # the conversion report (printed or logged), then the raise
    assert re.search(r"kv_a_proj_with_mqa.*\bCONVERSION\b", report), report[-2000:]
    assert "Weight shape (576, 256) not divisible by scale grid (5, 2)" in report, report[-2000:]

"""What a format means on disk (``checkpoint/formats.py``): the tensors a quantized weight becomes, their shapes and
dtypes, the input shapes a format takes, and how stored tensors read back as values.

Expected values are written out by hand from the layouts (ModelOpt's export for the modelopt formats, the engines'
``weight_scale_inv`` for fp8-block), never computed by the code under test.  The byte-level agreement with ModelOpt
is tests/checkpoint/test_quantize_command.py and tests/export/test_families.py.
"""

from __future__ import annotations

import pytest
import torch

from moeq_triton.checkpoint.formats import FORMATS, dequantize, output_layout, output_names
from moeq_triton.checkpoint.io import CheckpointError
from moeq_triton.checkpoint.quantize import make_plan

F8 = torch.float8_e4m3fn

FP32 = torch.float32
LAYOUTS = {  # a [256, 320] weight named x.weight
    "nvfp4": [("x.weight", (256, 160), torch.uint8), ("x.weight_scale", (256, 20), F8), ("x.weight_scale_2", (), FP32)],
    "fp8": [("x.weight", (256, 320), F8), ("x.weight_scale", (), FP32)],
    "fp8-per-channel": [("x.weight", (256, 320), F8), ("x.weight_scale", (256,), FP32)],
    "fp8-block": [("x.weight", (256, 320), F8), ("x.weight_scale_inv", (2, 3), FP32)],
}


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_names_shapes_and_dtypes_of_a_quantized_weight(fmt):
    got = list(zip(output_names("x.weight", FORMATS[fmt]), output_layout((256, 320), FORMATS[fmt])))
    assert [(n, tuple(s), d) for n, (s, d) in got] == LAYOUTS[fmt]


def test_stacked_experts_are_named_and_laid_out_as_modelopt_writes_them():
    """A stacked [E, in, out] parameter: scales named ``<param>_weight_scale``, quantized along ``in`` and stored
    with the last two dims as in the source."""
    fmt = FORMATS["nvfp4"]
    stacked = "m.experts.gate_up_proj"
    assert output_names(stacked, fmt) == [stacked, f"{stacked}_weight_scale", f"{stacked}_weight_scale_2"]
    layout = [(tuple(s), d) for s, d in output_layout((2, 32, 48), fmt, transposed=True)]
    assert layout == [((2, 16, 48), torch.uint8), ((2, 2, 48), F8), ((), torch.float32)]


def test_stored_tensors_read_back_as_values():
    fp8 = {"x.weight": torch.tensor([[1.0, -2.0], [4.0, 0.5]]).to(F8), "x.weight_scale": torch.tensor(0.5)}
    assert torch.equal(dequantize(fp8, "x.weight", FORMATS["fp8"]), torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
    fp8["x.weight_scale"] = torch.tensor([0.5, 2.0])
    assert torch.equal(dequantize(fp8, "x.weight", FORMATS["fp8-per-channel"]), torch.tensor([[0.5, -1.0], [8.0, 1.0]]))
    # NVFP4: byte 0x21 holds E2M1 codes 1 (0.5, low nibble: the even element) and 2 (1.0); block scale 2, scale_2 1/4
    nvfp4 = {
        "x.weight": torch.full((1, 8), 0x21, dtype=torch.uint8),
        "x.weight_scale": torch.tensor([[2.0]]).to(F8),
        "x.weight_scale_2": torch.tensor(0.25),
    }
    assert torch.equal(dequantize(nvfp4, "x.weight", FORMATS["nvfp4"]), torch.tensor([[0.25, 0.5] * 8]))
    block = {"x.weight": torch.ones(2, 130).to(F8), "x.weight_scale_inv": torch.tensor([[2.0, 3.0]])}
    expected = torch.cat([torch.full((2, 128), 2.0), torch.full((2, 2), 3.0)], dim=1)
    assert torch.equal(dequantize(block, "x.weight", FORMATS["fp8-block"]), expected)


def test_format_facts():
    assert {n: f.input_multiple for n, f in FORMATS.items()} == {
        "nvfp4": 16,
        "fp8": 1,
        "fp8-per-channel": 1,
        "fp8-block": 1,
    }
    assert [n for n, f in FORMATS.items() if f.shares_input_scale] == ["nvfp4"]
    assert FORMATS["fp8-block"].quantization_config([])["weight_block_size"] == [128, 128]
    assert FORMATS["nvfp4"].hf_quant_config([])["quantization"]["group_size"] == 16


class InMemorySource:
    """The five things make_plan reads of a source, for a one-expert Qwen3-MoE (gate/up input dim k)."""

    def __init__(self, k: int):
        self.config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_hidden_layers": 1}
        self.meta = {
            "model.layers.0.mlp.experts.0.gate_proj.weight": ((32, k), "BF16"),
            "model.layers.0.mlp.experts.0.up_proj.weight": ((32, k), "BF16"),
            "model.layers.0.mlp.experts.0.down_proj.weight": ((k, 32), "BF16"),
        }

    def names(self):
        return list(self.meta)

    def shape_dtype(self, name):
        return self.meta[name]

    def nbytes(self, name):
        return 2 * self.meta[name][0][0] * self.meta[name][0][1]

    def where(self, name):
        return "model.safetensors"


def test_an_input_dim_the_format_cannot_take_is_refused_naming_the_tensor():
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight .*nvfp4.*input dim \(-1\) that is a multiple of 16"):
        make_plan(InMemorySource(24), FORMATS["nvfp4"], False, 1 << 30)
    for fmt in ("fp8", "fp8-per-channel", "fp8-block"):  # any input dim
        plan = make_plan(InMemorySource(24), FORMATS[fmt], False, 1 << 30)
        gate, up, down = InMemorySource(24).meta
        assert sorted(u.names for u in plan.units) == sorted([[gate, up], [down]])  # gate/up: one scale group

"""moeq_triton.export_hf / load_hf: transformers and Megatron-Core models, against ModelOpt and the references."""

from __future__ import annotations

import json
import warnings

import modelopt.torch.quantization as mtq
import pytest
import torch
from modelopt.torch.export import export_hf_checkpoint

import moeq_triton
from moeq_triton.checkpoint.io import CheckpointError
from tests.assertions import assert_bitwise_equal, checkpoint_tensors, config_without
from tests.models import tiny_qwen3_moe, without_inputs

warnings.filterwarnings("ignore", message=".*transformers.*not tested.*")

OURS = {
    "nvfp4": "NVFP4_WEIGHT_ONLY_CFG",
    "fp8": "FP8_WEIGHT_ONLY_CFG",
    "fp8-per-channel": "FP8_PER_CHANNEL_WEIGHT_ONLY_CFG",
}
THEIRS = {"nvfp4": "W4A16_NVFP4_CFG", "fp8": "FP8_DEFAULT_CFG", "fp8-per-channel": "FP8_PER_CHANNEL_PER_TOKEN_CFG"}


WRITER_FIELDS = ("producer", "transformers_version", "dtype", "torch_dtype")  # name the writer or its library


@pytest.mark.parametrize("fmt", list(OURS))
def test_transformers_export_equals_modelopt_export(fmt, tmp_path):
    """triton_grouped + export_hf == ModelOpt max + export_hf_checkpoint: every tensor, byte for byte."""
    ours, theirs = tiny_qwen3_moe(), tiny_qwen3_moe()
    mtq.quantize(ours, getattr(moeq_triton, OURS[fmt]))
    mtq.quantize(theirs, without_inputs(getattr(mtq, THEIRS[fmt])))
    moeq_triton.export_hf(ours, tmp_path / "ours")
    export_hf_checkpoint(theirs, export_dir=tmp_path / "theirs")
    a, b = checkpoint_tensors(tmp_path / "ours"), checkpoint_tensors(tmp_path / "theirs")
    assert sorted(a) == sorted(b)
    for name in b:
        assert_bitwise_equal(a[name], b[name], name)
    for config in ("hf_quant_config.json", "config.json"):
        mine = config_without(json.loads((tmp_path / "ours" / config).read_text()), WRITER_FIELDS)
        reference = config_without(json.loads((tmp_path / "theirs" / config).read_text()), WRITER_FIELDS)
        assert mine == reference, config


def test_unquantized_transformers_export_round_trips(tmp_path):
    model = tiny_qwen3_moe()
    moeq_triton.export_hf(model, tmp_path / "plain")
    assert not (tmp_path / "plain" / "hf_quant_config.json").exists()
    config, tensors = moeq_triton.load_hf(tmp_path / "plain", dtype=torch.bfloat16)
    assert "quantization_config" not in config
    experts = model.model.layers[1].mlp.experts
    assert_bitwise_equal(tensors["model.layers.1.mlp.experts.3.down_proj.weight"], experts.down_proj[3], "down")
    assert_bitwise_equal(tensors["model.layers.1.mlp.experts.3.up_proj.weight"], experts.gate_up_proj[3, 32:], "up")


def test_destination_rules_and_failure_midway(tmp_path, monkeypatch):
    """A non-empty destination is refused; an exception midway leaves nothing the loader accepts."""
    model = tiny_qwen3_moe()
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        moeq_triton.export_hf(model, tmp_path / "taken")
    from moeq_triton.checkpoint import io

    original = io.AtomicCheckpointDir.write_shard
    calls = []

    def fails_on_second(self, file, tensors):
        calls.append(file)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, file, tensors)

    monkeypatch.setattr(io.AtomicCheckpointDir, "write_shard", fails_on_second)
    with pytest.raises(OSError, match="No space left"):
        moeq_triton.export_hf(model, tmp_path / "out", max_shard_bytes=20_000)
    assert len(calls) == 2
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(CheckpointError):
        moeq_triton.load_hf(tmp_path / "out")


def test_other_calibration_is_refused_not_silently_replaced(tmp_path):
    """export_hf recomputes max amaxes, so a weight quantizer calibrated otherwise must stop the export."""
    model = tiny_qwen3_moe()
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    quantizer = model.model.layers[0].self_attn.q_proj.weight_quantizer
    quantizer.set_from_attribute_config({"calibrator": "histogram"})  # ModelOpt's public setter
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_quantizer was calibrated with HistogramCalibrator"):
        moeq_triton.export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""Tiny real models for the calibration tests, and the checks that compare two calibrated models.

Models: transformers Qwen3 dense and Qwen3-MoE (fused 3-D experts) built from config classes, and the
same MoE with one ``nn.Linear`` per expert projection (the layout of Megatron's SequentialMLP and
of older HF MoEs).  Weights are heavy-tailed with a recorded seed.  The comparisons are bitwise and
say how much differs.
"""

from __future__ import annotations

import copy
import os

import modelopt.torch.opt as mto
import torch
from modelopt.torch.export import export_hf_checkpoint
from safetensors.torch import load_file
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP, Qwen3MoeSparseMoeBlock

from tests.assertions import assert_bitwise_equal
from tests.models import heavy_tailed_, qwen3_moe_config, tiny_qwen3_moe  # noqa: F401 (re-exported to the calibration tests)

SEED = 0  # every model below is heavy_tailed_(model, seed) (tests/models.py) with this default


class PerExpertLinears(nn.ModuleList):
    """One Qwen3MoeMLP (gate_proj, up_proj, down_proj nn.Linear) per expert, called like the fused experts."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                out.index_add_(0, token, (expert(hidden[token]) * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class PerExpertMoeBlock(Qwen3MoeSparseMoeBlock):
    """Its own class: ModelOpt registers a quantized wrapper per MoE block class on first sight (as a
    sequential MoE here), so the fused model's block class must not be reused in the same process."""


def per_expert_qwen3_moe(layers: int = 2, experts: int = 4, seed: int = SEED) -> nn.Module:
    cfg = qwen3_moe_config(layers, experts)
    model = Qwen3MoeForCausalLM(cfg)
    for layer in model.model.layers:
        layer.mlp.__class__ = PerExpertMoeBlock
        layer.mlp.experts = PerExpertLinears(
            Qwen3MoeMLP(cfg, intermediate_size=cfg.moe_intermediate_size) for _ in range(experts)
        )
    return heavy_tailed_(model.to(torch.bfloat16), seed)


def tiny_qwen3_dense(seed: int = SEED) -> nn.Module:
    cfg = Qwen3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, vocab_size=128,
    )  # fmt: skip
    cfg.architectures = ["Qwen3ForCausalLM"]
    return heavy_tailed_(Qwen3ForCausalLM(cfg).to(torch.bfloat16), seed)


def token_loop(vocab: int = 128, seed: int = SEED):
    """A forward loop of two batches of random token ids (every expert gets tokens at these sizes)."""
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, vocab, (2, 16), generator=gen) for _ in range(2)]

    def forward_loop(model: nn.Module) -> None:
        for ids in batches:
            model(ids)

    return forward_loop


def without_inputs(cfg: dict) -> dict:
    """ModelOpt's own config with input quantizers disabled: the weight-only reference."""
    cfg = copy.deepcopy(cfg)
    cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer", "enable": False})
    return cfg


def with_calibrator(cfg: dict, calibrator: str) -> dict:
    """The same config with every weight quantizer on ``calibrator``."""
    cfg = copy.deepcopy(cfg)
    for entry in cfg["quant_cfg"]:
        if "weight_quantizer" in entry.get("quantizer_name", "") and "cfg" in entry:
            entry["cfg"] = {**entry["cfg"], "calibrator": calibrator}
    return cfg


def amax_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.endswith("amax")}


def assert_same_amaxes(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = amax_buffers(ours), amax_buffers(theirs)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:8]
    assert any("weight_quantizer" in n for n in a), "no weight quantizer was calibrated"
    for name in a:
        assert_bitwise_equal(a[name], b[name], name)


def _renamed(value, ours: str):
    """The value with the string ``ours`` replaced by "max" everywhere (the only intended difference)."""
    if isinstance(value, str):
        return "max" if value == ours else value
    if isinstance(value, dict):
        return {k: _renamed(v, ours) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_renamed(v, ours) for v in value)
    return value


def _differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        return [] if same and torch.equal(a, b) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))[:6]}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def assert_same_modelopt_state(ours: nn.Module, theirs: nn.Module, calibrator: str) -> None:
    """``mto.modelopt_state`` equal once our calibrator's name reads "max"."""
    diff = _differences(_renamed(mto.modelopt_state(ours), calibrator), mto.modelopt_state(theirs))
    assert not diff, f"{len(diff)} modelopt_state entries differ: {diff[:6]}"


def assert_same_quantizer_attributes(ours: nn.Module, theirs: nn.Module) -> None:
    """Every TensorQuantizer attribute (flags, _input_dtype, ...) equal, the calibrator object aside."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    a = {n: m for n, m in ours.named_modules() if isinstance(m, TensorQuantizer)}
    b = {n: m for n, m in theirs.named_modules() if isinstance(m, TensorQuantizer)}
    assert a.keys() == b.keys() and a
    diff = []
    for name in a:
        x = {k: v for k, v in vars(a[name]).items() if k != "_calibrator"}
        y = {k: v for k, v in vars(b[name]).items() if k != "_calibrator"}
        diff += _differences(x, y, name)
    assert not diff, f"{len(diff)} quantizer attributes differ: {diff[:6]}"


def assert_same_shared_states(ours: nn.Module, theirs: nn.Module) -> None:
    """The q/k/v and gate/up shared weight-amax states max_calibrate attaches: the same modules at the same
    names, the same members, the same non-persistent ``_global_amax`` (value, dtype, device) and buffers.
    ModelOpt 0.45 has no such states: then neither model may hold one."""
    from modelopt.torch.quantization import utils

    if not hasattr(utils, "SharedQuantState"):
        for model in (ours, theirs):
            assert not any(hasattr(m, "_shared_quant_states") for m in model.modules())
        return
    from modelopt.torch.quantization.utils import SharedQuantState

    def states(model: nn.Module) -> dict[str, tuple]:
        names = {id(m): n for n, m in model.named_modules()}
        return {
            n: (
                type(m),
                [names[id(x)] for x in m.members],
                m.global_amax,
                dict(m._buffers),
                m._non_persistent_buffers_set,
            )
            for n, m in model.named_modules()
            if isinstance(m, SharedQuantState)
        }

    a, b = states(ours), states(theirs)
    assert a.keys() == b.keys() and a, sorted(set(a) ^ set(b))[:8]
    diff = [
        d
        for name in a
        for d in _differences(list(a[name][:2]) + list(a[name][3:]), list(b[name][:2]) + list(b[name][3:]), name)
    ]
    for name in a:
        x, y = a[name][2], b[name][2]
        if x is None or y is None:
            diff += [] if x is y else [f"{name}._global_amax: {x} != {y}"]
        else:
            assert (x.dtype, x.device, x.shape) == (y.dtype, y.device, y.shape), name
            assert_bitwise_equal(x, y, f"{name}._global_amax")
    assert not diff, f"{len(diff)} shared-state entries differ: {diff[:6]}"
    filled = [v[2] for v in a.values() if v[2] is not None]
    storages = {t.untyped_storage().data_ptr() for t in filled}
    assert len(storages) == len(filled), "two shared states hold one global_amax storage"


def assert_same_export(ours: nn.Module, theirs: nn.Module, tmp_path) -> None:
    """ModelOpt's export_hf_checkpoint of both models: the same files, tensors and configs, byte for byte."""
    for tag, model in (("ours", ours), ("theirs", theirs)):
        export_hf_checkpoint(model, export_dir=tmp_path / tag)
    files = sorted(f for f in os.listdir(tmp_path / "theirs") if f.endswith(".safetensors"))
    assert files and files == sorted(f for f in os.listdir(tmp_path / "ours") if f.endswith(".safetensors"))
    for f in files:
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "theirs" / f).read_bytes() or _tensor_diff(
            tmp_path, f
        )
    for config in ("hf_quant_config.json", "config.json"):
        assert (tmp_path / "ours" / config).read_text() == (tmp_path / "theirs" / config).read_text()


def _tensor_diff(tmp_path, f: str) -> bool:
    a, b = load_file(tmp_path / "ours" / f), load_file(tmp_path / "theirs" / f)
    assert a.keys() == b.keys()
    for key in a:
        assert_bitwise_equal(a[key], b[key], f"{f}:{key}")
    raise AssertionError(f"{f}: same tensors but different bytes (metadata or order)")


def assert_save_restore(model: nn.Module, build, tmp_path) -> None:
    """mto.save / mto.restore into a fresh model: the same saved amaxes and the same modelopt_state.

    (The shared q/k/v and gate/up states' ``_global_amax`` is a non-persistent buffer: ModelOpt does
    not save it, for max as for us.)"""
    mto.save(model, tmp_path / "model.pt")
    restored = mto.restore(build(seed=1), tmp_path / "model.pt")
    saved = {k: v for k, v in model.state_dict().items() if k.endswith("_amax")}
    loaded = {k: v for k, v in restored.state_dict().items() if k.endswith("_amax")}
    assert saved.keys() == loaded.keys() and any("weight_quantizer" in k for k in saved)
    for key in saved:
        assert_bitwise_equal(loaded[key], saved[key], key)
    diff = _differences(mto.modelopt_state(restored), mto.modelopt_state(model))
    assert not diff, f"{len(diff)} modelopt_state entries differ after restore: {diff[:6]}"

"""``moeq-triton inspect DIR``: what a checkpoint directory holds and whether the engines will serve it right.

Works on any Hugging Face checkpoint (ours, ModelOpt's, a source one) from its config files and tensors
alone: the format, quantized/kept counts per module kind, gate/up scale sharing, missing scales, a full
non-finite pass (grouped kernel calls per batch), and the engine verdicts of ``serving``.  ``--verify``
of the quantize command reuses the same checks.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeq_triton.checkpoint import serving
from moeq_triton.checkpoint.formats import FP8_BLOCK_CONFIG
from moeq_triton.checkpoint.io import CheckpointError, SourceCheckpoint, read_json
from moeq_triton.kernels.formats import FP8_BLOCK_SIZE, NVFP4_BLOCK_SIZE

ERROR = "error"  # would give wrong answers, or no engine can use it
WARNING = "warning"

QUANTIZED_DTYPES = ("F8_E4M3", "U8")
FLOAT_DTYPES = ("BF16", "F16", "F32")
SCALES = {  # format key -> suffixes a quantized ``.weight`` needs beside it
    "W4A16_NVFP4": ("_scale", "_scale_2"),
    "NVFP4": ("_scale", "_scale_2"),
    "FP8": ("_scale",),
    "FP8_PER_CHANNEL_PER_TOKEN": ("_scale",),
    "FP8_BLOCK_SCALES": ("_scale_inv",),
}
SHARED_SCALE = {"W4A16_NVFP4": "_scale_2", "NVFP4": "_scale_2", "FP8": "_scale"}
"""The per-tensor scale gate and up of one expert must share (vLLM keeps one per expert for w13)."""
_EXPERT_GATE = re.compile(r"^(.*\.experts\.\d+)\.(gate_proj|w1)\.weight$")
_UP_OF = {"gate_proj": "up_proj", "w1": "w3"}


@dataclass(kw_only=True)
class Finding:
    severity: str
    message: str
    about: str = "checkpoint"  # "checkpoint": its bytes and files; "serving": what the engines do with the format
    tensor: str = ""  # the tensor it is about, where it is about one
    nonfinite: bool = False  # a NaN/Inf finding (``--verify --allow-nonfinite-kept`` accepts those it allowed)


@dataclass(kw_only=True)
class Report:
    path: Path
    format: str  # a format key of serving.VERDICTS, another quant_algo, or "unquantized"
    declared_in: str
    moe: bool
    counts: dict[str, Counter] = field(default_factory=dict)  # module kind -> {"quantized": n, "kept": n}
    gate_up: str = "n/a"
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    def add(
        self, severity: str, message: str, about: str = "checkpoint", *, tensor: str = "", nonfinite: bool = False
    ) -> None:
        self.findings.append(
            Finding(severity=severity, message=message, about=about, tensor=tensor, nonfinite=nonfinite)
        )


def checkpoint_format(path: Path, config: dict) -> tuple[str, str, list[str]]:
    """(format key, the file that declares it, the module patterns it keeps unquantized)."""
    hf_quant = path / "hf_quant_config.json"
    if hf_quant.is_file():
        quantization = read_json(hf_quant).get("quantization", {})
        if not isinstance(quantization, dict):
            raise CheckpointError(f'{hf_quant}: "quantization" is a {type(quantization).__name__}, expected an object')
        return str(quantization.get("quant_algo")), hf_quant.name, _names(hf_quant, quantization, "exclude_modules")
    quant = config.get("quantization_config")
    if not quant:
        return "unquantized", "config.json (no quantization_config)", []
    if not isinstance(quant, dict):
        raise CheckpointError(
            f"{path / 'config.json'}: quantization_config is a {type(quant).__name__}, expected an object"
        )
    kept = [
        *_names(path / "config.json", quant, "ignored_layers"),
        *_names(path / "config.json", quant, "modules_to_not_convert"),
    ]
    ignore = _names(path / "config.json", quant, "ignore")
    method = quant.get("quant_method")
    if method == "modelopt":
        return str(quant.get("quant_algo")), "config.json", [*ignore, *kept]
    if method == "fp8" and quant.get("weight_block_size") == FP8_BLOCK_CONFIG["weight_block_size"]:
        return "FP8_BLOCK_SCALES", "config.json", kept
    if method == "fp8":
        return f"fp8 (weight_block_size {quant.get('weight_block_size')})", "config.json", kept
    return str(method), "config.json", [*ignore, *kept]


def _names(file: Path, table: dict, key: str) -> list[str]:
    """A list of module names (patterns) from a config; anything else is one line naming the file and key."""
    value = table.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{file}: {key} is not a list of module names")
    return value


def module_kind(weight_name: str) -> str:
    """``model.layers.3.mlp.experts.17.gate_proj.weight`` -> ``mlp.experts.*.gate_proj``."""
    module = weight_name.removesuffix(".weight")
    module = re.sub(r"\.\d+(?=\.|$)", ".*", module)
    return re.sub(r"^(model\.)?(language_model\.)?(model\.)?layers\.\*\.", "", module)


def inspect_checkpoint(path: str | os.PathLike, device: str = "cpu", batch_bytes: int = 256 << 20) -> Report:
    source = SourceCheckpoint(path)
    fmt, declared_in, kept_patterns = checkpoint_format(source.path, source.config)
    report = Report(path=source.path, format=fmt, declared_in=declared_in, moe=serving.is_moe(source.config))
    names = set(source.names())
    meta = {n: source.shape_dtype(n) for n in names}
    scale_suffixes = SCALES.get(fmt, ("_scale",))
    for name in sorted(names):
        if not name.endswith(".weight"):
            continue
        shape, dtype = meta[name]
        quantized = dtype in QUANTIZED_DTYPES
        report.counts.setdefault(module_kind(name), Counter())["quantized" if quantized else "kept"] += 1
        if quantized and not shape:
            report.add(ERROR, f"{name} is stored {dtype} with no dimensions: not a quantized weight of any format")
        elif quantized:
            for suffix in scale_suffixes if fmt in SCALES else ():
                if name + suffix not in names:
                    report.add(ERROR, f"{name} is quantized ({dtype}) but {name + suffix} is missing")
                elif (expected := scale_numel(fmt, suffix, shape)) != _numel(meta[name + suffix][0]):
                    report.add(
                        ERROR,
                        f"{name + suffix} has shape {list(meta[name + suffix][0])}: {expected} values expected "
                        f"for {fmt} and weight shape {list(shape)}",
                    )
            if fmt not in SCALES and not any(name + s in names for s in ("_scale", "_scale_inv")):
                report.add(ERROR, f"{name} is quantized ({dtype}) but has no weight_scale / weight_scale_inv")
        elif fmt in SCALES and len(shape) == 2 and dtype in FLOAT_DTYPES:  # formats whose kept-lists we read
            module = name.removesuffix(".weight")
            if re.search(r"(_proj|\.w[123])$", module) and not _listed(module, kept_patterns):
                report.add(
                    ERROR,
                    f"{name} is stored {dtype} but {module} is not listed as kept in {declared_in}: "
                    "the engines create a quantized layer for it",
                )
    _check_gate_up(source, names, fmt, report)
    _check_block_shapes(meta, fmt, report)
    _nonfinite_pass(source, names, meta, torch.device(device), batch_bytes, report)
    if fmt in serving.UNUSABLE_FOR_MOE and report.moe:
        report.add(ERROR, f"{fmt} of a MoE model: no engine serves it correctly (see the verdicts)", "serving")
    return report


def scale_numel(fmt: str, suffix: str, weight_shape: tuple[int, ...]) -> int:
    """How many values a scale holds for a stored weight of ``weight_shape`` (NVFP4: packed [N, K/2])."""
    rows = _numel(weight_shape[:-1])
    if fmt == "FP8_BLOCK_SCALES":
        return -(-weight_shape[0] // FP8_BLOCK_SIZE) * -(-weight_shape[-1] // FP8_BLOCK_SIZE)
    if suffix == "_scale" and fmt in ("W4A16_NVFP4", "NVFP4"):
        return rows * weight_shape[-1] * 2 // NVFP4_BLOCK_SIZE  # two 4-bit codes per stored byte
    if suffix == "_scale" and fmt == "FP8_PER_CHANNEL_PER_TOKEN":
        return rows
    return 1


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _listed(module: str, patterns: list[str]) -> bool:
    """Kept-module lists: exact names, prefixes (vLLM/SGLang ignored_layers) or wildcards (modelopt)."""
    return any(module == p or module.startswith(p + ".") or fnmatch.fnmatchcase(module, p) for p in patterns)


def _check_gate_up(source: SourceCheckpoint, names: set[str], fmt: str, report: Report) -> None:
    suffix = SHARED_SCALE.get(fmt)
    if fmt == "FP8_BLOCK_SCALES":
        block = f"{FP8_BLOCK_SIZE}x{FP8_BLOCK_SIZE}"
        report.gate_up = f"n/a (one scale per {block} block; the engines need no shared gate/up scale)"
    if suffix is None:
        return
    pairs = differ = 0
    for name in sorted(names):
        match = _EXPERT_GATE.match(name)
        if not match:
            continue
        up = f"{match.group(1)}.{_UP_OF[match.group(2)]}.weight"
        if name + suffix not in names or up + suffix not in names:
            continue  # reported as missing above
        pairs += 1
        a, b = source.tensor(name + suffix), source.tensor(up + suffix)
        if a.shape != b.shape or not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            differ += 1
            if differ <= 3:
                severity = ERROR if fmt != "FP8" else WARNING  # vLLM requantizes FP8 gate/up to their max
                report.add(
                    severity,
                    f"{match.group(1)}: gate and up weight{suffix} differ ({a.flatten()[:1].item():.6g} vs "
                    f"{b.flatten()[:1].item():.6g}); vLLM keeps one per expert (the gate's), TensorRT-LLM asserts",
                )
    report.gate_up = f"{pairs - differ}/{pairs} experts share weight{suffix}" if pairs else "no expert pairs"
    if differ > 3:
        report.add(report.findings[-1].severity, f"... {differ} experts in all have differing gate/up scales")


def _check_block_shapes(meta: dict, fmt: str, report: Report) -> None:
    """FP8 blocks: the engines' shape rule for merged and expert linears (serving.BLOCK_SHAPE_RULE)."""
    if fmt != "FP8_BLOCK_SCALES":
        return
    rows = {n: shape[0] for n, (shape, dtype) in meta.items() if dtype == "F8_E4M3" and shape}
    warning = block_shape_warning(rows)
    if warning:
        report.add(WARNING, warning, "serving")


_MERGED_ROWS = re.compile(
    r"(experts\.\d+\.(gate|up)_proj|experts\.\d+\.w[13]|self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)"
)


def block_shape_warning(rows: dict[str, int]) -> str | None:
    """FP8 blocks: the engines' rule (serving.BLOCK_SHAPE_RULE) over weight name -> output rows; the one
    warning ``inspect`` and ``quantize --format fp8-block`` print."""
    bad = sorted(n for n, r in rows.items() if _MERGED_ROWS.search(n) and r % FP8_BLOCK_SIZE)
    return f"{serving.BLOCK_SHAPE_RULE}: e.g. {bad[0]} has {rows[bad[0]]} rows" if bad else None


def _nonfinite_pass(
    source: SourceCheckpoint, names: set[str], meta: dict, device: torch.device, batch_bytes: int, report: Report
) -> None:
    """Every tensor read once, in batches: float tensors through grouped_amax (one launch per dtype on a
    GPU), FP8 bytes by their NaN pattern (0x7F / 0xFF); every non-finite tensor is named."""
    from moeq_triton.kernels import NonFiniteWeightError, grouped_amax

    batch: list[str] = []
    size = 0
    bad: list[str] = []

    def flush() -> None:
        floats = [n for n in batch if meta[n][1] in FLOAT_DTYPES]
        tensors = {n: source.tensor(n).to(device) for n in batch}
        try:
            grouped_amax([tensors[n].reshape(-1) for n in floats])
        except NonFiniteWeightError:
            bad.extend(n for n in floats if not bool(torch.isfinite(tensors[n]).all()))
        for n in batch:
            dtype = meta[n][1]
            if dtype == "F8_E4M3" and bool(((tensors[n].view(torch.uint8) & 0x7F) == 0x7F).any()):
                bad.append(n)
            elif dtype == "F8_E5M2" and bool(((tensors[n].view(torch.uint8) & 0x7C) == 0x7C).any()):
                bad.append(n)  # exponent all ones: Inf or NaN
            elif dtype == "F64" and not bool(torch.isfinite(tensors[n]).all()):
                bad.append(n)

    for name in sorted(names):
        batch.append(name)
        size += source.nbytes(name)
        if size >= batch_bytes:
            flush()
            batch, size = [], 0
    if batch:
        flush()
    for name in bad:
        report.add(
            ERROR, f"{name} ({meta[name][1]}) holds NaN or Inf ({source.where(name)})", tensor=name, nonfinite=True
        )


# ---------------------------------------------------------------- printing


def render(report: Report) -> str:
    lines = [f"{report.path}: {report.format} (from {report.declared_in}){', MoE' if report.moe else ''}"]
    lines.append("module kind                                  quantized    kept")
    for kind in sorted(report.counts):
        c = report.counts[kind]
        lines.append(f"  {kind:<42} {c['quantized']:>9} {c['kept']:>7}")
    lines.append(f"gate/up scales: {report.gate_up}")
    if report.format in serving.VERDICTS:
        lines.append("engines (verdicts for MoE checkpoints; versions read: "
                     + ", ".join(f"{e} {v}" for e, v in serving.VERSIONS.items()) + "):")  # fmt: skip
        lines.extend(f"  {line}" for line in serving.summary(report.format).splitlines())
    elif report.format != "unquantized":
        lines.append(f"engines: {report.format} is not in the serving table (nothing read for it)")
    for f in report.findings:
        lines.append(f"{f.severity}: {f.message}")
    lines.append(
        f"{len(report.errors)} problem(s) that give wrong answers or block serving"
        if report.errors
        else "no problem found that would give wrong answers"
    )
    return "\n".join(lines)


def run_inspect(path: str, device: str) -> int:
    """The command: print the report; exit 1 when a problem would give wrong answers."""
    import sys

    try:
        report = inspect_checkpoint(path, device)
    except CheckpointError as error:
        print(f"moeq-triton: error: {error}", file=sys.stderr)
        return 1
    print(render(report))
    return 1 if report.errors else 0

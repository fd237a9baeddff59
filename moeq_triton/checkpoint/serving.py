"""What vLLM, SGLang and TensorRT-LLM do with each checkpoint format of a MoE model, as data.

One table serves the README, ``moeq-triton inspect`` and the command's end-of-run warning, so the three
never disagree.  Facts from reading the loaders' source (vLLM 0.33.0 and SGLang 0.5.23 wheels, TensorRT-LLM
main, 2026-11-29; the ``fp8-block`` rows from the three projects' ``Fp8Config`` loaders, quoted in
tests/kernels/test_fp8_block.py); nothing here ran on a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

ENGINES = ("vLLM", "SGLang", "TensorRT-LLM")
VERSIONS = {"vLLM": "0.33.0", "SGLang": "0.5.23", "TensorRT-LLM": "main (2026-11)"}
GPUS = ("Hopper", "Blackwell")

WEIGHT_ONLY = "runs weight-only"
DYNAMIC_FP8 = "runs (FP8 weights, dynamic FP8 activations)"
WRONG = "runs but wrong"
REFUSED = "refused"


class Verdict(NamedTuple):
    outcome: str
    note: str = ""


def _same(verdict: Verdict) -> dict[str, Verdict]:
    return dict.fromkeys(GPUS, verdict)


VERDICTS: dict[str, dict[str, dict[str, Verdict]]] = {
    "W4A16_NVFP4": {
        "vLLM": _same(Verdict(WEIGHT_ONLY, "Marlin for linears and experts")),
        "SGLang": {
            "Hopper": Verdict(WEIGHT_ONLY, "experts on Marlin"),
            "Blackwell": Verdict(
                WRONG,
                "the default MoE runner (flashinfer trtllm) runs experts W4A4 with input scales of 1.0; "
                "pass --moe-runner-backend marlin to run them weight-only",
            ),
        },
        "TensorRT-LLM": _same(
            Verdict(WEIGHT_ONLY, "experts dequantized to bf16 every forward; asserts gate/up weight_scale_2 equal")
        ),
    },
    "FP8": {
        "vLLM": _same(
            Verdict(WRONG, "no input_scale: attention activations quantize to zero; experts run W8A8 with scale 1.0")
        ),
        "SGLang": _same(Verdict(WRONG, "no input_scale: the float32-min placeholder zeroes attention activations")),
        "TensorRT-LLM": _same(
            Verdict(WRONG, "experts: KeyError on w1.input_scale or the max of an uninitialized buffer, by version")
        ),
    },
    "FP8_PER_CHANNEL_PER_TOKEN": {
        "vLLM": _same(Verdict(REFUSED, "the FP8 MoE method is per tensor: reshape(()) of the [N] scale raises")),
        "SGLang": _same(Verdict(REFUSED, 'ModelOptFp8Config: "only supports regular FP8 quantization"')),
        "TensorRT-LLM": _same(Verdict(REFUSED, 'fp8-rowwise MoE: "Unsupported quantization mode"')),
    },
    "FP8_BLOCK_SCALES": {
        "vLLM": _same(Verdict(DYNAMIC_FP8, "Fp8Config with weight_block_size; activations per 1x128 token group")),
        "SGLang": {
            "Hopper": Verdict(DYNAMIC_FP8, "Fp8Config with weight_block_size; activations per 1x128 token group"),
            "Blackwell": Verdict(
                DYNAMIC_FP8,
                "as on Hopper; where DeepGEMM runs, the block scales are requantized to powers of two (UE8M0) "
                "at load (requant_weight_ue8m0_inplace)",
            ),
        },
        "TensorRT-LLM": _same(Verdict(DYNAMIC_FP8, "FP8_BLOCK_SCALES (the DeepSeek-V3 FP8 path)")),
    },
}
"""format key (quant_algo, or FP8_BLOCK_SCALES for the engines' block layout) -> engine -> GPU -> verdict."""

BLOCK_SHAPE_RULE = (
    "vLLM and SGLang refuse FP8 blocks at load when an expert's intermediate size, or one part of a merged "
    "linear (q/k/v, a dense gate/up), is not a multiple of 128 per tensor-parallel rank"
)

UNUSABLE_FOR_MOE = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN"}
"""Formats no engine serves correctly for a MoE model: the checkpoint itself is the problem."""


EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
"""Where the common families' config.json gives the number of routed experts."""


def is_moe(config: dict) -> bool:
    """A config.json of a Mixture-of-Experts model; a count that is not an integer counts as none."""
    return any(isinstance(n := config.get(k), int) and n > 1 for k in EXPERT_COUNT_KEYS)


def summary(key: str) -> str:
    """One line per engine: what each GPU generation does with this format."""
    lines = []
    for engine in ENGINES:
        by_gpu = VERDICTS[key][engine]
        if by_gpu["Hopper"] == by_gpu["Blackwell"]:
            verdict = by_gpu["Hopper"]
            lines.append(f"{engine}: {verdict.outcome} ({verdict.note})")
        else:
            parts = [f"{gpu}: {v.outcome} ({v.note})" for gpu, v in by_gpu.items()]
            lines.append(f"{engine}: " + "; ".join(parts))
    return "\n".join(lines)


def end_of_run_warning(quant_algo: str, config: dict) -> str | None:
    """The warning printed after writing a format no engine serves correctly for this (MoE) model."""
    if quant_algo not in UNUSABLE_FOR_MOE or not is_moe(config):
        return None
    behaviour = "\n".join(f"  {line}" for line in summary(quant_algo).splitlines())
    return (
        f"warning: no engine serves this {quant_algo} checkpoint of a MoE model correctly "
        f"(vLLM {VERSIONS['vLLM']}, SGLang {VERSIONS['SGLang']}, TensorRT-LLM {VERSIONS['TensorRT-LLM']}):\n"
        f"{behaviour}\n"
        "  ModelOpt's own export of this config writes the same files. Use --format fp8-block (FP8 weights in "
        "128x128 blocks, which all three run with dynamic FP8 activations) or --format nvfp4 (weight-only)."
    )


FORMAT_NAMES = {
    "W4A16_NVFP4": "`nvfp4` (W4A16_NVFP4)",
    "FP8": "`fp8` (FP8)",
    "FP8_PER_CHANNEL_PER_TOKEN": "`fp8-per-channel`",
    "FP8_BLOCK_SCALES": "`fp8-block`",
}


def markdown_table() -> str:
    """The README's format x engine x GPU table (tests/test_inspect.py checks the README holds it)."""
    header = "| format | " + " | ".join(f"{e} {VERSIONS[e]}: {g}" for e in ENGINES for g in GPUS) + " |"
    rows = [header, "|" + "---|" * (1 + len(ENGINES) * len(GPUS))]
    for key, name in FORMAT_NAMES.items():
        cells = [VERDICTS[key][e][g].outcome for e in ENGINES for g in GPUS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)

"""Per-architecture naming rules of Hugging Face checkpoints: what is quantized, kept, and shares a scale.

One module serves the model-free command (and the exporter): the rules reproduce what ModelOpt 0.47
does to the same model with its weight-only configs (checked tensor by tensor in the tests):
- linear weights are quantized; embeddings, norms, the MoE router (``mlp.gate``) and ``lm_head`` are
  kept, and the kept linears/embeddings are listed in ``exclude_modules``;
- gate_proj and up_proj of one expert share their amax in every format (transformers 5 holds them as
  one fused ``gate_up_proj`` tensor per expert, which ModelOpt calibrates as one weight);
- for NVFP4, q/k/v of a layer (and gate/up of a dense MLP) share ``weight_scale_2`` as ModelOpt's
  shared global-amax state does; FP8 keeps one scale per projection there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Naming:
    architectures: tuple[str, ...]
    quantized: re.Pattern  # weights of linears that are quantized
    excluded: re.Pattern  # weights of linears/embeddings kept in high precision (listed as excluded)
    experts: re.Pattern  # the routed-expert subset of ``quantized`` (for --experts-only)
    expert_pairs: re.Pattern  # group(1) names the expert; shared in every format
    nvfp4_groups: tuple[re.Pattern, ...]  # group(1) names the scale group; NVFP4 only

    def scale_group(self, name: str, nvfp4: bool) -> str:
        """Tensors with the same key must share their amax (one weight_scale_2 / FP8 scale)."""
        match = self.expert_pairs.match(name)
        if match:
            return match.group(1) + ".gate_up"
        if nvfp4:
            for pattern in self.nvfp4_groups:
                match = pattern.match(name)
                if match:
                    return match.group(1) + ".*"
        return name


QWEN3_MOE = Naming(
    architectures=("Qwen3MoeForCausalLM",),
    quantized=re.compile(
        r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight$"
    ),
    excluded=re.compile(r"^(lm_head|model\.embed_tokens|model\.layers\.\d+\.mlp\.gate)\.weight$"),
    experts=re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$"),
    expert_pairs=re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.\d+)\.(gate|up)_proj\.weight$"),
    nvfp4_groups=(
        re.compile(r"^(model\.layers\.\d+\.self_attn)\.[qkv]_proj\.weight$"),
        re.compile(r"^(model\.layers\.\d+\.mlp)\.(gate|up)_proj\.weight$"),
    ),
)

NAMINGS = (QWEN3_MOE,)


def naming_for(config: dict) -> Naming:
    """The rules for a config.json's ``architectures``; a clear error names what is supported."""
    names = config.get("architectures") or []
    for naming in NAMINGS:
        if any(name in naming.architectures for name in names):
            return naming
    supported = ", ".join(a for n in NAMINGS for a in n.architectures)
    raise UnsupportedArchitecture(
        f"architecture {names or config.get('model_type', 'unknown')} is not supported yet; supported: {supported}"
    )


def module_of(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")

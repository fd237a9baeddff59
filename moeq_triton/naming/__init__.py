"""Naming rules of every supported architecture, as data: what is quantized, kept, and shares a scale.

``rules`` holds the machinery, ``hf`` one rule set per Hugging Face family, ``megatron`` the
Megatron-Core -> HF renames; the model-free command and the exporter both go through ``naming_for``.
"""

from __future__ import annotations

from moeq_triton.naming.hf import FAMILIES
from moeq_triton.naming.rules import KEEP, PASS, QUANTIZE, Decision, Family, Naming, UnsupportedArchitecture, module_of

__all__ = [
    "FAMILIES",
    "KEEP",
    "PASS",
    "QUANTIZE",
    "Decision",
    "Family",
    "Naming",
    "UnsupportedArchitecture",
    "family_for",
    "module_of",
    "naming_for",
    "supported_architectures",
]


def supported_architectures() -> str:
    return ", ".join(a for family in FAMILIES for a in family.architectures)


def family_for(config: dict) -> Family:
    """The family of a config.json: by ``architectures``, else by ``model_type``; a clear error otherwise."""
    names = config.get("architectures") or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise UnsupportedArchitecture(
            f"config.json: architectures is {names!r}, expected a list of model class names "
            f"(e.g. [{FAMILIES[0].architectures[0]!r}])"
        )
    for family in FAMILIES:
        if any(name in family.architectures for name in names):
            return family
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    if not names:
        for family in FAMILIES:
            if model_type in family.model_types:
                return family
    raise UnsupportedArchitecture(
        f"architecture {', '.join(names) or model_type or 'unknown'} (config.json) is not supported yet; "
        f"supported: {supported_architectures()}"
    )


def naming_for(config: dict, exclude: tuple[str, ...] = ()) -> Naming:
    """The rules for one checkpoint: its family, where its MTP layers start, the user's --exclude globs."""
    layers = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    return Naming(family_for(config), layers, tuple(exclude))

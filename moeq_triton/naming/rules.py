"""The rule machinery: a family's naming is data (module patterns); this turns it into per-tensor decisions.

Each tensor is quantized (with its scale group), kept and listed in ``exclude_modules``, or passed through,
exactly as ModelOpt 0.47's ``export_hf_checkpoint`` treats the same module with its weight-only configs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = r"(?:model\.|model\.language_model\.|language_model\.model\.)"
"""Where a text model's modules live: plain, Qwen3.5-style (``model.language_model.``), Llama-4-style."""

MACROS = {"{P}": PREFIX, "{L}": PREFIX + r"layers\.\d+", "{E}": r"\d+"}
"""Placeholders of the patterns: ``{P}`` text prefix, ``{L}`` one decoder layer, ``{E}`` an expert index."""

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
"""Sibling linears fed the same input: ModelOpt gives them one NVFP4 weight_scale_2 (not in FP8)."""

EXPERT_PAIRS = (("gate_proj", "up_proj"), ("w1", "w3"))
"""gate/up of a routed expert: one amax in every format (transformers holds them as one fused tensor)."""

QUANTIZE, KEEP, PASS = "quantize", "keep", "pass"


class UnsupportedArchitecture(ValueError):
    """A config.json whose architecture no family covers; the message lists the supported ones."""


@dataclass(frozen=True, kw_only=True)
class Family:
    """One architecture family's naming, as data. Patterns are full-match regexes over module names
    (a tensor name without ``.weight``) with the placeholders of ``MACROS``."""

    name: str  # as the README's support table names it
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    routed: tuple[str, ...]  # routed-expert linears: quantized, also under --experts-only
    quantized: tuple[str, ...]  # every other linear quantized by default
    kept: tuple[str, ...]  # linears / embeddings kept in high precision and listed in exclude_modules
    shared_input: tuple[tuple[str, ...], ...] = SHARED_INPUT
    kept_prefixes: tuple[str, ...] = ()  # whole subtrees copied as they are: ``mtp``, vision towers (``prefix*``)
    stacked: tuple[str, ...] = ()  # routed experts stored as one [E, in, out] tensor per projection (bmm layout)
    split: tuple[
        str, ...
    ] = ()  # stacked [E, out, in] experts on disk, written per expert (``gate_up_proj``: [gate; up])
    notes: str = ""  # what the README says is kept / special


def _compile(patterns: Iterable[str]) -> re.Pattern | None:
    parts = []
    for pattern in patterns:
        for macro, regex in MACROS.items():
            pattern = pattern.replace(macro, regex)
        parts.append(f"(?:{pattern})")
    return re.compile("|".join(parts)) if parts else None


@dataclass
class Decision:
    """What happens to one source tensor."""

    action: str  # QUANTIZE, KEEP or PASS
    routed: bool = False
    exclude: str | None = None  # the exclude_modules entry this tensor adds (KEEP only)
    transposed: bool = False  # a stacked [E, in, out] tensor: quantized along ``in`` (ModelOpt's bmm experts)


@dataclass
class Naming:
    """A family's rules applied to one checkpoint (its config and the user's --exclude globs)."""

    family: Family
    num_hidden_layers: int | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._routed = _compile(self.family.routed)
        self._quantized = _compile(self.family.quantized)
        self._kept = _compile(self.family.kept)
        self._stacked = _compile(self.family.stacked)
        self._split = _compile(self.family.split)
        self._layer = re.compile(PREFIX + r"?layers\.(\d+)\.")
        self.unused_excludes = set(self.exclude)

    @property
    def architectures(self) -> tuple[str, ...]:
        return self.family.architectures

    def is_split(self, name: str) -> bool:
        """A stacked [E, out, in] expert tensor on disk that the plan reads as one 2-D tensor per expert."""
        return bool(self._split and self._split.fullmatch(name))

    def kept_prefix(self, name: str) -> str | None:
        """``model.layers.61`` / ``mtp`` / ``vision_model``: the copied subtree a tensor belongs to, if any
        (multi-token-prediction layers are the decoder layers numbered from ``num_hidden_layers`` on)."""
        for prefix in self.family.kept_prefixes:
            if name.startswith(prefix + "."):
                return prefix
        match = self._layer.match(name)
        if match and self.num_hidden_layers is not None and int(match.group(1)) >= self.num_hidden_layers:
            return match.group(0)[:-1]
        return None

    def decide(self, name: str, experts_only: bool = False) -> Decision:
        """What happens to one tensor of the checkpoint."""
        module = module_of(name)
        prefix = self.kept_prefix(name)
        if prefix is not None:
            return Decision(KEEP, exclude=prefix + "*")
        stacked = bool(self._stacked and self._stacked.fullmatch(name))
        if stacked:
            module = name.rpartition(".")[0]  # the experts module holds the stacked parameters
        elif not name.endswith(".weight"):
            return Decision(PASS)
        routed = stacked or bool(self._routed and self._routed.fullmatch(module))
        if routed or (self._quantized and self._quantized.fullmatch(module)):
            matched = [g for g in self.exclude if fnmatch.fnmatchcase(module, g)]
            self.unused_excludes.difference_update(matched)
            if matched or (experts_only and not routed):
                return Decision(KEEP, routed, exclude=module)
            return Decision(QUANTIZE, routed, transposed=stacked)
        if self._kept and self._kept.fullmatch(module):
            return Decision(KEEP, exclude=module)
        return Decision(PASS)

    def scale_groups(self, names: list[str], nvfp4: bool, routed: set[str]) -> dict[str, str]:
        """Scale-group key of each quantized tensor: tensors with one key share their amax.

        A routed expert's gate/up always share; for NVFP4, siblings fed the same input (``shared_input``,
        the first set of which another member is present) share too."""
        present = set(names)
        keys = {}
        for name in names:
            parent, _, leaf = module_of(name).rpartition(".")
            keys[name] = name
            sets = EXPERT_PAIRS if name in routed else (self.family.shared_input if nvfp4 else ())
            for members in sets:
                siblings = [f"{parent}.{m}.weight" for m in members if m != leaf]
                if leaf in members and any(s in present for s in siblings):
                    keys[name] = f"{parent}.{'+'.join(members)}"
                    break
        return keys


def module_of(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")

"""Megatron-Core GPTModel parameters -> Hugging Face tensors, as data: one table of Megatron modules, one
spelling per HF family, and how each parameter is cut across tensor-parallel ranks.

A Megatron parameter becomes one or more HF tensors (fused QKV -> q/k/v, a GLU ``linear_fc1`` -> gate/up);
under the family's HF name it then follows the family's own kept / quantized / scale-group rules
(``naming.hf``), so the Megatron export and ``moeq-triton quantize`` of the same weights agree.

How Megatron cuts a parameter over the ``parts`` ranks of its tensor-parallel group (``CUTS``):
column-parallel along dim 0, row-parallel along dim 1, fused QKV by query group (each rank holds whole
groups: [q heads of the group, k, v] per group), GLU ``linear_fc1`` as [gate slice; up slice] per rank, and
the vocab-parallel embedding / output layer along dim 0 over a padded vocabulary whose padding rows are
dropped.  Experts are cut over the expert-tensor-parallel group instead.

Biases follow the HF config (``Spelling.qkv_bias`` / ``proj_bias`` / ``mlp_bias``): a Megatron bias the HF model
would not have, or a missing one it would, is refused rather than written for engines to trip over or ignore.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COPY, COLUMN, ROW, QKV, GLU, VOCAB = "copy", "column", "row", "qkv", "glu", "vocab"
CUTS = (COPY, COLUMN, ROW, QKV, GLU, VOCAB)
"""copy: the same on every rank; column / row: dim 0 / 1; qkv: per query group, then split;
glu: [gate; up] per rank; vocab: dim 0, padding rows past the HF vocab_size dropped."""

GROUPED_FC1, GROUPED_FC2 = "grouped_fc1", "grouped_fc2"
"""GroupedMLP's stacked ``weight1`` [H, E_local * fc1_out] and ``weight2`` [E_local * fc2_in, H]: per expert,
the transposed block is that expert's ``linear_fc1`` (a GLU cut) / ``linear_fc2`` (a row cut)."""


@dataclass(frozen=True, kw_only=True)
class Spelling:
    """How one HF family names the modules a Megatron layer holds (``{L}`` = ``model.layers.<global i>``)."""

    mlp: str = "mlp"  # the dense MLP (dense models, dense-first layers)
    gate_up_down: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    experts: str = "mlp.experts"  # routed expert e is ``{experts}.{e}``
    expert_gate_up_down: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    router: str | None = "mlp.gate"
    router_bias: str | None = None  # Megatron ``router.expert_bias`` (aux-loss-free balancing)
    shared: str | None = None  # shared experts
    shared_gate: str | None = None  # the shared-expert gate (a [1, H] linear)
    qk_norm: bool = True
    # Whether the HF model has biases on q/k/v, o_proj and the MLP linears (dense, shared, expert): the config key
    # that says so (absent = false, every family's default), or a constant.  Megatron biases the family lacks are
    # refused, and so are missing ones it expects (HF would load the first unused, initialise the second at random).
    qkv_bias: str | bool = "attention_bias"
    proj_bias: str | bool = "attention_bias"
    mlp_bias: str | bool = False


DENSE = Spelling(router=None, experts="")
SPELLINGS: dict[str, Spelling] = {
    "Qwen3 (dense)": DENSE,
    "Llama (dense)": Spelling(router=None, experts="", qk_norm=False, mlp_bias="mlp_bias"),
    "Qwen3-MoE": Spelling(),
    "Qwen2-MoE": Spelling(
        shared="mlp.shared_expert",
        shared_gate="mlp.shared_expert_gate",
        qk_norm=False,
        qkv_bias="qkv_bias",
        proj_bias=False,
    ),
    "GLM-4.5 / 4.6 / 4.7": Spelling(
        shared="mlp.shared_experts", router_bias="mlp.gate.e_score_correction_bias", qk_norm=False, proj_bias=False
    ),
    "Mixtral": Spelling(
        experts="block_sparse_moe.experts",
        expert_gate_up_down=("w1", "w3", "w2"),
        router="block_sparse_moe.gate",
        qk_norm=False,
        qkv_bias=False,
        proj_bias=False,
    ),
}
"""The families a Megatron GPTModel exports to, by ``naming.hf`` family name."""

_L = r"decoder\.layers\.(?P<layer>\d+)\."
_E = r"mlp\.experts\.(?:local_experts\.(?P<expert>\d+)\.linear_fc(?P<fc>[12])\.(?P<p>weight|bias)|"
_E += r"linear_fc(?P<tfc>[12])\.(?P<tp>weight|bias)(?P<texpert>\d+))"

TABLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (r"embedding\.word_embeddings\.weight", VOCAB, ("{P}embed_tokens.weight",)),
    (r"output_layer\.weight", VOCAB, ("lm_head.weight",)),
    (r"decoder\.final_layernorm\.weight", COPY, ("{P}norm.weight",)),
    (_L + r"input_layernorm\.weight", COPY, ("{L}.input_layernorm.weight",)),
    (_L + r"self_attention\.linear_qkv\.layer_norm_weight", COPY, ("{L}.input_layernorm.weight",)),
    (
        _L + r"self_attention\.linear_qkv\.(?P<p>weight|bias)",
        QKV,
        ("{L}.self_attn.q_proj.{p}", "{L}.self_attn.k_proj.{p}", "{L}.self_attn.v_proj.{p}"),
    ),
    (_L + r"self_attention\.linear_proj\.weight", ROW, ("{L}.self_attn.o_proj.weight",)),
    (_L + r"self_attention\.linear_proj\.bias", COPY, ("{L}.self_attn.o_proj.bias",)),
    (_L + r"self_attention\.q_layernorm\.weight", COPY, ("{L}.self_attn.q_norm.weight",)),
    (_L + r"self_attention\.k_layernorm\.weight", COPY, ("{L}.self_attn.k_norm.weight",)),
    (_L + r"pre_mlp_layernorm\.weight", COPY, ("{L}.post_attention_layernorm.weight",)),
    (_L + r"mlp\.linear_fc1\.layer_norm_weight", COPY, ("{L}.post_attention_layernorm.weight",)),
    (_L + r"mlp\.linear_fc1\.(?P<p>weight|bias)", GLU, ("{L}.{mlp}.{gate}.{p}", "{L}.{mlp}.{up}.{p}")),
    (_L + r"mlp\.linear_fc2\.weight", ROW, ("{L}.{mlp}.{down}.weight",)),
    (_L + r"mlp\.linear_fc2\.bias", COPY, ("{L}.{mlp}.{down}.bias",)),
    (_L + r"mlp\.router\.weight", COPY, ("{L}.{router}.weight",)),
    (_L + r"mlp\.router\.expert_bias", COPY, ("{L}.{router_bias}",)),
    (
        _L + r"mlp\.shared_experts\.linear_fc1\.(?P<p>weight|bias)",
        GLU,
        ("{L}.{shared}.{gate}.{p}", "{L}.{shared}.{up}.{p}"),
    ),
    (_L + r"mlp\.shared_experts\.linear_fc2\.weight", ROW, ("{L}.{shared}.{down}.weight",)),
    (_L + r"mlp\.shared_experts\.linear_fc2\.bias", COPY, ("{L}.{shared}.{down}.bias",)),
    (_L + r"mlp\.shared_experts\.gate_weight", COPY, ("{L}.{shared_gate}.weight",)),
    (_L + _E, "expert", ()),  # SequentialMLP and TEGroupedMLP: below, per fc
    (_L + r"mlp\.experts\.weight1", GROUPED_FC1, ()),
    (_L + r"mlp\.experts\.weight2", GROUPED_FC2, ()),
)
"""(Megatron parameter pattern, cut, HF name templates); full matches of the local parameter name."""

_COMPILED = tuple((re.compile(pattern), cut, targets) for pattern, cut, targets in TABLE)


@dataclass(frozen=True)
class Mapped:
    """One Megatron parameter's HF side: the cut and the HF names it becomes (one per output)."""

    cut: str
    names: tuple[str, ...]
    expert_local: int | None = None  # SequentialMLP / TEGroupedMLP: the local expert index


class UnmappedParameter(ValueError):
    """A Megatron parameter the chosen family has no spelling for; the message names both."""


def supported_layouts() -> str:
    return ", ".join(SPELLINGS)


_BIAS_KIND = re.compile(r".*\.(?:(?P<qkv>linear_qkv)|(?P<proj>linear_proj)|mlp\..*linear_fc[12])\.(?:weight|bias)\d*")
_DEFAULTS = {"qwen2_moe": {"qkv_bias": True}}
"""Config keys whose transformers default is true (a config.json written with ``use_diff`` may omit them)."""


def bias_kind(megatron_name: str) -> str | None:
    """ "qkv", "proj" or "mlp" for a Megatron linear's weight or bias (dense, shared or expert); None otherwise."""
    match = _BIAS_KIND.fullmatch(megatron_name)
    if match is None:
        return None
    return "qkv" if match["qkv"] else "proj" if match["proj"] else "mlp"


def family_has_bias(family: str, kind: str, config: dict) -> tuple[bool, str]:
    """Whether ``family``'s HF model, built from ``config``, has ``kind`` biases, and why (for messages)."""
    rule = getattr(SPELLINGS[family], f"{kind}_bias")
    if isinstance(rule, bool):
        return rule, f"the {family} HF model has {'a' if rule else 'no'} {kind} bias"
    value = bool(config.get(rule, _DEFAULTS.get(config.get("model_type", ""), {}).get(rule, False)))
    return value, f"the HF config has {rule}={str(value).lower()}"


def hf_names(
    megatron_name: str,
    family: str,
    *,
    layer_of: dict[int, int],
    first_expert: int = 0,
    prefix: str = "model.",
    config: dict | None = None,
) -> Mapped:
    """The HF names of one local Megatron parameter under ``family``'s spelling.

    layer_of: local decoder layer index -> global index (pipeline stages); first_expert: this rank's
    first global expert index (expert parallelism); config: the HF config, whose bias keys a Megatron bias must
    agree with (None: not checked).  Grouped weights (``weight1`` / ``weight2``) map to the
    experts' template ``{experts}.{e}`` with ``{e}`` left for the caller, who splits the stack.
    """
    spelling = SPELLINGS.get(family)
    if spelling is None:
        raise UnmappedParameter(f"the {family} family has no Megatron layout here; supported: {supported_layouts()}")
    for pattern, cut, targets in _COMPILED:
        match = pattern.fullmatch(megatron_name)
        if match is None:
            continue
        groups = {k: v for k, v in match.groupdict().items() if v is not None}
        layer = f"{prefix}layers.{layer_of[int(groups['layer'])]}" if "layer" in groups else ""
        gate, up, down = spelling.gate_up_down
        fields = dict(P=prefix, L=layer, mlp=spelling.mlp, gate=gate, up=up, down=down, p=groups.get("p", ""))
        fields.update(router=spelling.router, router_bias=spelling.router_bias, shared=spelling.shared,
                      shared_gate=spelling.shared_gate)  # fmt: skip
        needed = {n for t in targets for n in re.findall(r"\{(\w+)\}", t)}
        missing = sorted(n for n in needed if fields.get(n) is None)
        if "layernorm" in megatron_name and ("q_layernorm" in megatron_name or "k_layernorm" in megatron_name):
            if not spelling.qk_norm:
                missing.append("qk_norm")
        if missing or (cut in ("expert", GROUPED_FC1, GROUPED_FC2) and not spelling.experts):
            raise UnmappedParameter(
                f"Megatron parameter {megatron_name} has no {family} counterpart (the family has no "
                f"{', '.join(missing) or 'routed experts'}); Megatron layouts supported: {supported_layouts()}"
            )
        kind = bias_kind(megatron_name) if re.search(r"\.bias\d*$", megatron_name) else None
        if kind is not None and config is not None:
            present, why = family_has_bias(family, kind, config)
            if not present:
                raise UnmappedParameter(f"Megatron parameter {megatron_name} has no {family} counterpart: {why}")
        if cut == "expert":
            local = int(groups.get("expert") or groups["texpert"])
            fc, p = groups.get("fc") or groups["tfc"], groups.get("p") or groups["tp"]
            base = f"{layer}.{spelling.experts}.{first_expert + local}"
            e_gate, e_up, e_down = spelling.expert_gate_up_down
            if fc == "1":
                return Mapped(GLU, (f"{base}.{e_gate}.{p}", f"{base}.{e_up}.{p}"), local)
            return Mapped(ROW if p == "weight" else COPY, (f"{base}.{e_down}.{p}",), local)
        if cut in (GROUPED_FC1, GROUPED_FC2):
            e_gate, e_up, e_down = spelling.expert_gate_up_down
            base = f"{layer}.{spelling.experts}.{{e}}"
            names = (f"{base}.{e_gate}.weight", f"{base}.{e_up}.weight") if cut == GROUPED_FC1 else (
                f"{base}.{e_down}.weight",)  # fmt: skip
            return Mapped(cut, names)
        return Mapped(cut, tuple(t.format(**fields) for t in targets))
    raise UnmappedParameter(
        f"Megatron parameter {megatron_name} has no {family} counterpart; Megatron layouts supported: "
        f"{supported_layouts()} (dense MLP, shared experts + gate, SequentialMLP, TEGroupedMLP, GroupedMLP)"
    )

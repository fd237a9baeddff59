"""``"calibrator": "triton_grouped"``: whole-model grouped weight calibration inside ``mtq.quantize``.

ModelOpt's ``max`` weight calibration calls every weight quantizer once per weight, so a model with
thousands of experts costs thousands of small reductions.  Here the weight quantizers whose config
says ``"triton_grouped"`` only *record* the weights ModelOpt feeds them (through each module's own
``iter_weights_for_calibration()``); the records are then reduced in one grouped launch per dtype for
the whole model and each quantizer receives exactly the amax ModelOpt's ``MaxCalibrator`` would hold
(same dtype, 0-dim per tensor, [N, 1] per channel).  Everything after that (sync, export,
save/restore) is ModelOpt's own code.

Scale modes:
- ``"triton_grouped"``: one amax per quantizer, i.e. per expert (ModelOpt >= 0.47 semantics);
- ``"triton_grouped_shared"``: every expert quantizer of one grouped linear takes the max over all of
  that linear's experts (ModelOpt <= 0.46 semantics; some grouped-GEMM backends want one scale).

Under torch.distributed the flush also reduces the amaxes across ranks (``collectives.max_reduce``:
one all_reduce per process group plus one layout check), and ModelOpt's per-quantizer sync then
skips those quantizers.

ModelOpt 0.47 accepts only "max" and "histogram" and has no registry, so ``register()`` patches
private places (the pydantic validator, the calibrator closure, the per-quantizer sync and MoE
completeness check, ``weight_only_quantize``), checks the version first, and is idempotent.
Importing ``moeq_triton`` calls it.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .collectives import DATA, EXPERT, TENSOR, SyncItem, active, max_reduce
from .kernels import NonFiniteWeightError, grouped_amax, grouped_row_amax

CALIBRATOR = "triton_grouped"
CALIBRATOR_SHARED = "triton_grouped_shared"
NAMES = (CALIBRATOR, CALIBRATOR_SHARED)
SUPPORTED_MODELOPT = "0.47."

_registered = False


# ---------------------------------------------------------------------------------------------
# The calibrator: records weights; a grouped pass fills in the amaxes.


def _calibrator_class():
    from modelopt.torch.quantization.calib import MaxCalibrator

    class TritonGroupedCalibrator(MaxCalibrator):
        """A MaxCalibrator whose ``collect`` is deferred to one grouped pass over all weights."""

        def __init__(self, num_bits=8, axis=None, unsigned=False, shared: bool = False):
            super().__init__(num_bits, axis, unsigned)
            self.shared = shared
            self.synced = False  # True once its amax went through our cross-rank reduction

        @torch.no_grad()
        def collect(self, x: torch.Tensor) -> None:
            if x.device.type == "meta" or not _groupable_axis(self._axis, x):
                return super().collect(x)  # ModelOpt's own reduction for layouts we do not group
            PENDING.add(self, x, *_CURRENT[0])

        def compute_amax(self):
            if PENDING.has(self):
                PENDING.flush()
            return self._calib_amax

        def reset(self):
            PENDING.discard(self)
            self.synced = False
            super().reset()

    return TritonGroupedCalibrator


def _groupable_axis(axis, x: torch.Tensor) -> bool:
    """Per tensor (axis None) or per output channel of a 2-D weight (axis 0)."""
    return axis is None or (axis in (0, -2, (0,), [0]) and x.dim() == 2)


@dataclass
class _Record:
    calibrator: object
    weight: torch.Tensor
    quantizer_name: str | None
    groups: tuple = ()  # process groups its amax must agree over (see sync_groups)


@dataclass
class StatRow:
    """One line of the quantization statistics table."""

    quantizer: str
    shapes: list[tuple[int, ...]]
    amax: float | None  # max over the (per-channel) amax; None when no weight reached the quantizer


class _Pending:
    """Weights recorded since the last flush, in the order ModelOpt fed them."""

    def __init__(self) -> None:
        self.records: list[_Record] = []
        self.last_stats: list[StatRow] = []

    def add(self, calibrator, weight: torch.Tensor, name: str | None, groups: tuple) -> None:
        self.records.append(_Record(calibrator, weight.detach(), name, groups))

    def has(self, calibrator) -> bool:
        return any(r.calibrator is calibrator for r in self.records)

    def discard(self, calibrator) -> None:
        self.records = [r for r in self.records if r.calibrator is not calibrator]

    @torch.no_grad()
    def flush(self, member_of: tuple | None = None) -> None:
        """Reduce every recorded weight: one grouped launch per dtype (per tensor and per channel).

        member_of: the process groups of this rank (only from the whole-model pass, which every rank
        runs); then the amaxes are also reduced across ranks, one collective per group.  A lazy flush
        (compute_amax outside that pass) stays local and leaves the sync to ModelOpt.
        """
        records, self.records = self.records, []
        if not records:
            return
        per_tensor = [r for r in records if r.calibrator._axis is None]
        per_channel = [r for r in records if r.calibrator._axis is not None]
        results: dict[int, torch.Tensor] = {}  # id(calibrator) -> amax in float32
        owner: dict[int, _Record] = {}
        for group, reduce in ((per_tensor, grouped_amax), (per_channel, grouped_row_amax)):
            if not group:
                continue
            try:
                amaxes = reduce([r.weight for r in group])
            except NonFiniteWeightError as error:
                record = group[error.index]
                name = record.quantizer_name or "an unnamed quantizer"
                raise ValueError(f"weight of {name} (shape {tuple(record.weight.shape)}) contains NaN or Inf") from None
            for record, amax in zip(group, amaxes):
                key = id(record.calibrator)
                owner.setdefault(key, record)
                amax = amax.reshape(-1, 1) if record.calibrator._axis is not None else amax
                results[key] = torch.maximum(results[key], amax) if key in results else amax
        families = _share_within_families(results, owner)
        if member_of is not None:
            _reduce_across_ranks(results, owner, families, member_of)
        for key, amax in results.items():
            record = owner[key]
            # MaxCalibrator keeps the weight's dtype: the max of bf16 values is exact in bf16.
            record.calibrator._calib_amax = amax.to(record.weight.dtype)
            record.calibrator.synced = member_of is not None
        self.last_stats = _stats(records, results)


PENDING = _Pending()
_CURRENT: list[tuple[str | None, tuple]] = [(None, ())]  # the quantizer being fed now, and its groups


_EXPERT_INDEX = re.compile(r"(?<=experts)\.\d+(?=\.)|\.\d+$")


def scale_family(quantizer_name: str) -> str:
    """Quantizers of one grouped linear share a family: the expert index becomes '*'.

    'layers.0.mlp.experts.linear_fc1.weight_quantizer.3' (TE GroupedLinear),
    'layers.0.mlp.experts.gate_up_proj_weight_quantizers.3' (HF fused experts) and
    'layers.0.mlp.experts.local_experts.3.linear_fc1.weight_quantizer' (SequentialMLP) all drop the 3.
    """
    return _EXPERT_INDEX.sub(".*", quantizer_name)


def _share_within_families(results: dict[int, torch.Tensor], owner: dict[int, _Record]) -> dict[str, list[int]]:
    """Shared mode: every per-tensor amax of a family becomes the family's max; returns the families."""
    families: dict[str, list[int]] = {}
    for key, record in owner.items():
        if getattr(record.calibrator, "shared", False) and record.quantizer_name and record.calibrator._axis is None:
            families.setdefault(scale_family(record.quantizer_name), []).append(key)
    for keys in families.values():
        shared = torch.stack([results[k] for k in keys]).amax()
        for k in keys:
            results[k] = shared
    return families


def _reduce_across_ranks(
    results: dict[int, torch.Tensor], owner: dict[int, _Record], families: dict[str, list[int]], member_of: tuple
) -> None:
    """One SyncItem per quantizer (or per shared family), one collective per process group."""
    in_family = {k for keys in families.values() for k in keys}
    items = [
        SyncItem(owner[k].quantizer_name or f"#{i}", results[k], owner[k].groups)
        for i, k in enumerate(results)
        if k not in in_family
    ]
    family_items = {}
    for family, keys in families.items():
        groups = tuple(dict.fromkeys(g for k in keys for g in owner[k].groups))  # ordered union
        family_items[family] = SyncItem(f"family:{family}", results[keys[0]], groups)
    max_reduce([*items, *family_items.values()], member_of)
    for item, k in zip(items, (k for k in results if k not in in_family)):
        results[k] = item.value
    for family, keys in families.items():
        for k in keys:
            results[k] = family_items[family].value


def _stats(records: list[_Record], results: dict[int, torch.Tensor]) -> list[StatRow]:
    rows: dict[int, StatRow] = {}
    for r in records:
        key = id(r.calibrator)
        row = rows.setdefault(key, StatRow(r.quantizer_name or "?", [], None))
        row.shapes.append(tuple(r.weight.shape))
    values = torch.stack([results[k].amax() for k in rows]).tolist() if rows else []  # one host sync
    for row, value in zip(rows.values(), values):
        row.amax = value
    return list(rows.values())


# ---------------------------------------------------------------------------------------------
# Whole-model weight calibration: ModelOpt's weight_only_quantize with names and one flush.


def _grouped_weight_only_quantize(original):
    def weight_only_quantize(model: torch.nn.Module) -> None:
        """ModelOpt's loop over ``iter_weights_for_calibration()``, then one grouped flush."""
        from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer
        from modelopt.torch.quantization.utils import enable_weight_access_and_writeback

        ours = [m for m in model.modules() if isinstance(m, TensorQuantizer) and _is_ours(m)]
        if not ours:
            return original(model)
        names = {id(m): name for name, m in model.named_modules()}
        name_to_module = dict(model.named_modules())
        fed: set[int] = set()
        seen: set[int] = set()
        try:
            for module in name_to_module.values():
                if id(module) in seen or not isinstance(module, QuantModule):
                    continue
                seen.add(id(module))
                with enable_weight_access_and_writeback(module, model, name_to_module):
                    for weight, quantizer in module.iter_weights_for_calibration():
                        for leaf in _leaves(quantizer):
                            fed.add(id(leaf))
                        _CURRENT[0] = (names.get(id(quantizer)), sync_groups(module, names[id(module)], quantizer))
                        try:
                            quantizer(weight)
                        finally:
                            _CURRENT[0] = (None, ())
        except BaseException:
            PENDING.records.clear()  # a failed pass must not leak its records into the next one
            raise
        PENDING.flush(member_of=rank_groups())
        missing = [
            names[id(q)]
            for q in ours
            if id(q) not in fed and not q._disabled and "weight_quantizer" in names.get(id(q), "")
        ]
        PENDING.last_stats += [StatRow(name, [], None) for name in missing]
        if missing:
            warnings.warn(
                f"{len(missing)} weight quantizer(s) using {CALIBRATOR!r} received no weight from "
                f"iter_weights_for_calibration() and stay uncalibrated: {', '.join(missing[:8])}"
                + (" ..." if len(missing) > 8 else ""),
                stacklevel=2,
            )

    weight_only_quantize.__wrapped__ = original
    weight_only_quantize._moeq_triton = True
    return weight_only_quantize


def sync_groups(module: torch.nn.Module, module_name: str, quantizer) -> tuple:
    """The process groups a weight quantizer's amax must agree over, by ModelOpt's own rules.

    Data parallel always; tensor parallel for a column-parallel weight (per tensor) or a row-parallel
    weight (per tensor or per output channel: its rows are split along K); expert parallel only for
    non-routed weights or in the shared-scale mode (routed experts on other EP ranks are other tensors).
    Expert modules carry Megatron's expert-data / expert-tensor groups in their parallel_state.
    """
    if not active():
        return ()
    state = getattr(module, "parallel_state", None)
    if state is None:
        return ((DATA, None),)  # torch.distributed without Megatron: the world group
    groups = []
    if state.data_parallel_group.is_initialized():
        groups.append((DATA, state.data_parallel_group.group))
    axis = quantizer._axis
    split = (getattr(module, "_is_column_parallel", False) and axis is None) or (
        getattr(module, "_is_row_parallel", False) and axis in (None, 0)
    )
    if split and state.tensor_parallel_group.is_initialized():
        groups.append((TENSOR, state.tensor_parallel_group.group))
    routed = "experts" in module_name and "shared_experts" not in module_name
    shared = getattr(quantizer._calibrator, "shared", False)
    if (not routed or shared) and state.expert_model_parallel_group.is_initialized():
        groups.append((EXPERT, state.expert_model_parallel_group.group))
    return tuple(groups)


def rank_groups() -> tuple | None:
    """Every group this rank belongs to, whether or not it holds a quantizer for it (None: no sync)."""
    if not active():
        return None
    try:
        from megatron.core import parallel_state as mcore
    except ImportError:
        return ((DATA, None),)
    if not mcore.model_parallel_is_initialized():
        return ((DATA, None),)
    return (
        (DATA, mcore.get_data_parallel_group()),
        (DATA, mcore.get_data_parallel_group(with_context_parallel=True)),
        (DATA, mcore.get_expert_data_parallel_group()),
        (EXPERT, mcore.get_expert_model_parallel_group()),
        (TENSOR, mcore.get_tensor_model_parallel_group()),
        (TENSOR, mcore.get_expert_tensor_parallel_group()),
    )


def _synced(quantizer) -> bool:
    """Its amax already went through our cross-rank reduction."""
    return getattr(getattr(quantizer, "_calibrator", None), "synced", False)


def _is_ours(quantizer) -> bool:
    return type(getattr(quantizer, "_calibrator", None)).__name__ == "TritonGroupedCalibrator"


def _leaves(quantizer) -> Iterator:
    from modelopt.torch.quantization.nn import TensorQuantizer

    if isinstance(quantizer, TensorQuantizer):
        yield quantizer
    else:
        for q in quantizer:
            yield from _leaves(q)


def calibration_stats() -> list[StatRow]:
    """Rows of the last grouped calibration: quantizer name, weight shape(s), amax."""
    return list(PENDING.last_stats)


def format_stats(rows: list[StatRow] | None = None):
    """A rich Table of the statistics (quantizer, weight shape, amax), like ModelOpt PR #971 shows."""
    from rich.table import Table

    rows = calibration_stats() if rows is None else rows
    table = Table(title=f"Weight calibration ({CALIBRATOR}): {len(rows)} quantizers")
    table.add_column("quantizer")
    table.add_column("weight shape")
    table.add_column("amax", justify="right")
    for row in rows:
        shape = ", ".join(str(list(s)) for s in row.shapes) or "no weight"
        table.add_row(row.quantizer, shape, "-" if row.amax is None else f"{row.amax:.4e}")
    return table


# ---------------------------------------------------------------------------------------------
# Registration with ModelOpt 0.47.


def register() -> None:
    """Make "triton_grouped" (and "triton_grouped_shared") valid calibrator names.  Idempotent."""
    global _registered
    if _registered:
        return
    import modelopt
    import pydantic

    if not modelopt.__version__.startswith(SUPPORTED_MODELOPT):
        raise RuntimeError(
            f"moeq-triton's {CALIBRATOR!r} calibrator patches ModelOpt internals written for "
            f"nvidia-modelopt {SUPPORTED_MODELOPT}x; found {modelopt.__version__}. "
            "Install nvidia-modelopt==0.47.* or a moeq-triton release that supports your version."
        )
    from modelopt.torch.quantization import config as qconfig
    from modelopt.torch.quantization import model_calib
    from modelopt.torch.quantization.nn import TensorQuantizer

    # 1. The validator: accept our names, defer everything else (so typos still fail).
    decorators = qconfig.QuantizerAttributeConfig.__pydantic_decorators__.field_validators
    validator = decorators["validate_calibrator"]
    original_validate = validator.func

    def validate_calibrator(value, info):
        if isinstance(value, str) and value in NAMES:
            return value
        return original_validate(value, info)

    decorators["validate_calibrator"] = dataclasses.replace(validator, func=validate_calibrator)
    models = [
        obj
        for obj in vars(qconfig).values()
        if isinstance(obj, type) and issubclass(obj, pydantic.BaseModel) and obj is not pydantic.BaseModel
    ]
    qconfig.QuantizerAttributeConfig.model_rebuild(force=True)
    for model_cls in models:  # every config that embeds QuantizerAttributeConfig compiled its validator
        model_cls.model_rebuild(force=True)

    # 2. The calibrator closure: translate our names into the calibrator class.
    calibrator_cls = _calibrator_class()
    original_set = TensorQuantizer.set_from_attribute_config

    def set_from_attribute_config(self, attribute_cfg):
        value = attribute_cfg.get("calibrator") if hasattr(attribute_cfg, "get") else None
        if isinstance(value, str) and value in NAMES:
            constructor = (calibrator_cls, (), {"shared": value == CALIBRATOR_SHARED})
            if isinstance(attribute_cfg, dict):
                attribute_cfg = {**attribute_cfg, "calibrator": constructor}
            else:
                attribute_cfg = attribute_cfg.model_copy(update={"calibrator": constructor})
            original_set(self, attribute_cfg)
            for attr in ("_num_bits", "_axis", "_unsigned"):  # what ModelOpt gives its own calibrators
                if hasattr(self, attr):
                    setattr(self._calibrator, attr, getattr(self, attr))
            return
        original_set(self, attribute_cfg)

    set_from_attribute_config.__wrapped__ = original_set
    TensorQuantizer.set_from_attribute_config = set_from_attribute_config

    # 3. ModelOpt's per-quantizer sync and completeness check skip amaxes we already reduced.
    original_sync = TensorQuantizer.sync_amax_across_distributed_group

    def sync_amax_across_distributed_group(self, parallel_group):
        if not _synced(self):
            original_sync(self, parallel_group)

    sync_amax_across_distributed_group.__wrapped__ = original_sync
    TensorQuantizer.sync_amax_across_distributed_group = sync_amax_across_distributed_group
    original_check = model_calib._check_moe_calibration_complete

    def check_moe_calibration_complete(quantizer, parallel_state):
        # One all_gather_object per leaf per group, and a hang when ranks hold different modules
        # (ModelOpt #831/#862).  Our layout check already covers our quantizers; a disabled one has
        # no amax to compare.  Everything else still goes through ModelOpt's check.
        for leaf in _leaves(quantizer):
            if not (leaf._disabled or _synced(leaf)):
                original_check(leaf, parallel_state)

    model_calib._check_moe_calibration_complete = check_moe_calibration_complete

    # 4. Whole-model weight calibration with quantizer names and one flush.
    if not getattr(model_calib.weight_only_quantize, "_moeq_triton", False):
        model_calib.weight_only_quantize = _grouped_weight_only_quantize(model_calib.weight_only_quantize)
    _registered = True


# ---------------------------------------------------------------------------------------------
# Ready configs, shaped like ModelOpt's own (same disabled patterns), inputs disabled.


def _weight_only(base: dict, calibrator: str = CALIBRATOR) -> dict:
    cfg = copy.deepcopy(base)
    entries = []
    for entry in cfg["quant_cfg"]:
        name = entry.get("quantizer_name", "")
        if "input_quantizer" in name and "cfg" in entry:
            entries.append({"quantizer_name": name, "enable": False})
            continue
        if "weight_quantizer" in name and "cfg" in entry:
            entry = {**entry, "cfg": {**entry["cfg"], "calibrator": calibrator}}
        entries.append(entry)
    cfg["quant_cfg"] = entries
    return cfg


def make_configs() -> dict[str, dict]:
    import modelopt.torch.quantization as mtq

    return {
        "NVFP4_WEIGHT_ONLY_CFG": _weight_only(mtq.W4A16_NVFP4_CFG),
        "FP8_WEIGHT_ONLY_CFG": _weight_only(mtq.FP8_DEFAULT_CFG),
        "FP8_PER_CHANNEL_WEIGHT_ONLY_CFG": _weight_only(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG),
    }

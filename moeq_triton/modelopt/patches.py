"""Every place where moeq-triton touches ModelOpt internals, named, version-checked and reversible.

ModelOpt has no registry of calibrator names and no hook into ``max_calibrate``; each patch below
says what it replaces and why, checks that the target still looks as expected before touching it, and
``tests/modelopt/test_modelopt_patches.py`` fails when ModelOpt changes a target.  Each patch closes
over the ModelOpt function it replaces and hands it to our code; nothing fetches an original back.
No other module of the package reads or writes a ModelOpt private name or replays a ModelOpt-internal
step: the accessors at the end are the only way in (``tests/modelopt/test_modelopt_privates.py``).

Supported releases: nvidia-modelopt 0.45.x, 0.46.x and 0.47.x (``SUPPORTED_RANGE``).  What differs
between them, as the patches see it, is one ``Release`` each: 0.45's ``max_calibrate`` has no
``shared_states`` parameter and 0.45 has no shared q/k/v and gate/up weight-amax states at all; 0.46
and 0.47 have both (0.47 adds ``GroupedQuantizer``, which the patches never name).  ``preflight``
checks every target of the installed release before any patch is installed: all patches, or none and
a one-line error.  On any other version (or a changed target) only ``refuse_calibrator_names`` is
installed, so that a config naming our calibrator fails with that same line instead of ModelOpt's
bare pydantic assertion.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch

SUPPORTED_RANGE = ">=0.45,<0.48"  # the nvidia-modelopt versions these patches were written for (pyproject's extra)


class UnsupportedModelOptError(RuntimeError):
    """The installed ModelOpt is not one the patches were written for, or a patch target changed.

    A RuntimeError, not a ValueError: raised inside ModelOpt's pydantic validator (the refusal), it
    propagates as it is instead of being folded into a multi-line ValidationError.
    """


MAX_CALIBRATE_BASE = ("model", "forward_loop", "distributed_sync", "sync_expert_weight_amax")


@dataclass(frozen=True)
class Release:
    """What one supported ModelOpt release (major.minor) looks like to the patches."""

    name: str  # "0.47"
    max_calibrate_params: tuple[str, ...]
    shared_states: bool  # max_calibrate attaches and populates SharedWeightGlobalAmaxState (q/k/v, gate/up)


RELEASES = {
    "0.45": Release("0.45", MAX_CALIBRATE_BASE, shared_states=False),
    "0.46": Release(
        "0.46", (*MAX_CALIBRATE_BASE, "shared_states", "skip_forward_without_activation_calib"), shared_states=True
    ),
    "0.47": Release(
        "0.47", (*MAX_CALIBRATE_BASE, "shared_states", "skip_forward_without_activation_calib"), shared_states=True
    ),
}


def modelopt_version() -> str:
    import modelopt

    return modelopt.__version__


def release_of(version: str) -> Release | None:
    """The supported release a version string belongs to ("0.46.1", "0.47.0rc2" ...), or None."""
    match = re.match(r"(\d+)\.(\d+)(?![\d])", version)
    return RELEASES.get(f"{int(match[1])}.{int(match[2])}") if match else None


def supported_versions() -> str:
    return f"nvidia-modelopt{SUPPORTED_RANGE} ({', '.join(r + '.x' for r in RELEASES)})"


def check_version() -> Release:
    """The installed release, or UnsupportedModelOptError naming the version found and the supported range."""
    found = modelopt_version()
    release = release_of(found)
    if release is None:
        raise UnsupportedModelOptError(
            f"moeq-triton's 'triton_grouped' calibrator supports {supported_versions()}; found nvidia-modelopt "
            f"{found}. Install 'nvidia-modelopt{SUPPORTED_RANGE}' or a moeq-triton release that supports {found}."
        )
    return release


_ACTIVE: list[Release] = []  # the release whose patch set is installed (empty: none)


def active_release() -> Release | None:
    """The release the installed patches were chosen for, None before registration."""
    return _ACTIVE[0] if _ACTIVE else None


def mark_installed(release: Release) -> None:
    """Record that every patch of ``release``'s set is in place (``register`` calls it last)."""
    _ACTIVE[:] = [release]


def shared_states_supported() -> bool:
    """Whether the installed ModelOpt's ``max_calibrate`` keeps shared q/k/v and gate/up weight-amax states."""
    release = active_release()
    return release.shared_states if release is not None else check_version().shared_states


def preflight() -> Release:
    """Check every patch target of the installed release before any is installed: all patches, or none
    and a clear error.  Returns the release whose patch set ``install`` then installs."""
    from modelopt.torch.quantization import config as qconfig
    from modelopt.torch.quantization import model_calib
    from modelopt.torch.quantization import utils as qutils
    from modelopt.torch.quantization.mode import MaxCalibrateModeDescriptor
    from modelopt.torch.quantization.nn import TensorQuantizer

    release = check_version()
    _check_validator(qconfig)
    set_from_config = _target("calibrator_constructor", TensorQuantizer.set_from_attribute_config)
    params = list(inspect.signature(set_from_config).parameters)
    _expect(params == ["self", "attribute_cfg"], "calibrator_constructor", f"signature is now {params}")
    max_calibrate = _target("max_calibrate", model_calib.max_calibrate)
    _expect(
        MaxCalibrateModeDescriptor.__dict__.get("_calib_func") in (model_calib.max_calibrate, *_replacements()),
        "max_calibrate",
        "MaxCalibrateModeDescriptor._calib_func is no longer model_calib.max_calibrate",
    )
    params = list(inspect.signature(max_calibrate).parameters)
    _expect(
        params == list(release.max_calibrate_params),
        "max_calibrate",
        f"max_calibrate's parameters are now {params}",
    )
    called = inspect.unwrap(max_calibrate).__code__.co_names
    for patch, function in (
        ("weight_only_quantize", "weight_only_quantize"),
        ("moe_completeness", "_check_moe_calibration_complete"),
    ):
        _expect(function in called, patch, f"max_calibrate no longer calls model_calib.{function}")
        _expect(hasattr(model_calib, function), patch, f"model_calib.{function} is gone")
    _expect(
        "layer_sync_moe_local_experts_amax" in called,
        "max_calibrate",
        "max_calibrate no longer syncs SequentialMLP experts by layer_sync_moe_local_experts_amax",
    )
    has_states = hasattr(qutils, "SharedWeightGlobalAmaxState") and hasattr(qutils, "SharedQuantState")
    _expect(
        has_states == release.shared_states and ("SharedWeightGlobalAmaxState" in called) == release.shared_states,
        "max_calibrate",
        f"shared weight-amax states are {'present' if has_states else 'absent'}, "
        f"unlike every {release.name}.x release the patches were written for",
    )
    _expect(
        hasattr(TensorQuantizer, "sync_amax_across_distributed_group"),
        "distributed_sync",
        "TensorQuantizer.sync_amax_across_distributed_group is gone",
    )
    _preflight_calibrate_steps()
    return release


def _target(name: str, current):
    """The ModelOpt function a patch replaces: the current attribute, or the original once patched."""
    return PATCHES[name].original if name in PATCHES else current


def _check_validator(qconfig) -> None:
    decorators = qconfig.QuantizerAttributeConfig.__pydantic_decorators__.field_validators
    _expect("validate_calibrator" in decorators, "calibrator_name", "no field validator 'validate_calibrator'")
    fields = decorators["validate_calibrator"].info.fields
    _expect(fields == ("calibrator",), "calibrator_name", f"the validator checks {fields}")


def _preflight_calibrate_steps() -> None:
    """Targets of patches 7-8."""
    from modelopt.torch.quantization import model_quant
    from modelopt.torch.quantization.nn import TensorQuantizer

    validate = _target("checked_amax", TensorQuantizer.validate_attr)
    params = list(inspect.signature(validate).parameters)
    _expect(
        params == VALIDATE_ATTR_PARAMS, "checked_amax", f"TensorQuantizer.validate_attr's parameters are now {params}"
    )
    code = inspect.unwrap(model_quant.calibrate).__code__
    constants = [c for const in code.co_consts for c in (const if isinstance(const, tuple) else (const,))]
    _expect(
        "validate_attr" in code.co_names and "_amax" in constants,
        "checked_amax",
        "mtq.calibrate no longer validates each quantizer's _amax",
    )
    properties = _target("modelopt_state_properties", TensorQuantizer._get_properties_for_modelopt_state)
    names = properties.__code__.co_names
    _expect(
        {"Module", "__dict__", "keys", "_skip_properties_for_save_restore"} <= set(names),
        "modelopt_state_properties",
        f"_get_properties_for_modelopt_state reads {names}",
    )


def _replacements() -> tuple:
    return tuple(p.replacement for p in PATCHES.values())


@dataclass(kw_only=True)
class Patch:
    """One replaced attribute: where it lives, what it held, and what replaced it."""

    name: str
    holder: object
    attribute: str
    original: object
    replacement: object


PATCHES: dict[str, Patch] = {}


def _expect(condition: bool, patch: str, what: str) -> None:
    if not condition:
        raise UnsupportedModelOptError(
            f"nvidia-modelopt {modelopt_version()} changed the target of moeq-triton's patch {patch!r}: {what}. "
            f"The patches were written for {supported_versions()}."
        )


def _install(name: str, holder: object, attribute: str, make: Callable[[object], object]) -> None:
    if name in PATCHES:
        return
    original = getattr(holder, attribute)
    replacement = make(original)
    replacement.__wrapped__ = original
    setattr(holder, attribute, replacement)
    PATCHES[name] = Patch(name=name, holder=holder, attribute=attribute, original=original, replacement=replacement)


# ---------------------------------------------------------------------------------------------
# 1. calibrator_name: the pydantic validator of QuantizerAttributeConfig.calibrator.


def valid_names_message(value: object, names: tuple[str, ...]) -> str:
    valid = ", ".join(repr(n) for n in ("max", "histogram", *names))
    return (
        f"calibrator {value!r} is not a known calibrator name; valid names: {valid} "
        f"({', '.join(repr(n) for n in names)} are registered by `import moeq_triton`), "
        "or a calibrator class / (class, args, kwargs) constructor"
    )


@dataclass
class _NameRule:
    """What the replaced validator does with our names: accept them, or raise ``refusal``."""

    names: tuple[str, ...] = ()
    refusal: UnsupportedModelOptError | None = None
    decorator: object = None  # ModelOpt's own Decorator entry, once ours replaced it


_NAME_RULE = _NameRule()


def patch_calibrator_name(names: tuple[str, ...]) -> None:
    """Accept our names, and say which names are valid when a string is not (typos stay rejected)."""
    _NAME_RULE.names, _NAME_RULE.refusal = names, None
    decorator = _replace_validator()
    PATCHES.setdefault(
        "calibrator_name",
        Patch(
            name="calibrator_name", holder=None, attribute="validate_calibrator", original=decorator, replacement=None
        ),
    )


def refuse_calibrator_names(names: tuple[str, ...], error: UnsupportedModelOptError) -> bool:
    """On a ModelOpt the patches do not support: a config naming our calibrator raises ``error`` (one line,
    the version found and the supported range) instead of ModelOpt's pydantic "Assertion failed".

    Only when the validator itself still looks as expected; returns whether the refusal is in place.
    Every other value still goes to ModelOpt's own validator, unchanged.
    """
    from modelopt.torch.quantization import config as qconfig

    if "calibrator_name" in PATCHES:
        return False  # registered: the names are accepted
    try:
        _check_validator(qconfig)
    except UnsupportedModelOptError:
        return False
    _NAME_RULE.names, _NAME_RULE.refusal = names, error
    _replace_validator()
    return True


def _replace_validator():
    """Swap the function pydantic stores for QuantizerAttributeConfig's calibrator validator (once).

    Pydantic compiles validators when a class is built: the stored function is swapped, then the
    config class and every model embedding it are rebuilt.  Returns ModelOpt's own Decorator entry.
    """
    import pydantic
    from modelopt.torch.quantization import config as qconfig

    if _NAME_RULE.decorator is not None:
        return _NAME_RULE.decorator
    decorators = qconfig.QuantizerAttributeConfig.__pydantic_decorators__.field_validators
    validator = decorators["validate_calibrator"]
    modelopt_validate = validator.func

    def validate_calibrator(value, info):
        if isinstance(value, str) and value in _NAME_RULE.names:
            if _NAME_RULE.refusal is not None:  # a fresh one-line error each time, not pydantic's wrapper
                raise UnsupportedModelOptError(str(_NAME_RULE.refusal)) from None
            return value
        try:
            return modelopt_validate(value, info)
        except (AssertionError, ValueError) as error:
            if isinstance(value, str) and _NAME_RULE.refusal is None:
                raise ValueError(valid_names_message(value, _NAME_RULE.names)) from error
            raise

    decorators["validate_calibrator"] = dataclasses.replace(validator, func=validate_calibrator)
    _NAME_RULE.decorator = validator
    qconfig.QuantizerAttributeConfig.model_rebuild(force=True)
    for obj in vars(qconfig).values():  # every config that embeds QuantizerAttributeConfig compiled it too
        if isinstance(obj, type) and issubclass(obj, pydantic.BaseModel) and obj is not pydantic.BaseModel:
            obj.model_rebuild(force=True)
    return validator


# ---------------------------------------------------------------------------------------------
# 2. calibrator_constructor: TensorQuantizer.set_from_attribute_config builds "max"/"histogram" in a
#    closure and calls anything else as a constructor; our names become (class, (), {"shared": ...}).


def patch_calibrator_constructor(names: tuple[str, ...], constructor: Callable[[str], tuple]) -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer

    def make(modelopt_set):
        def set_from_attribute_config(self, attribute_cfg):
            value = attribute_cfg.get("calibrator") if hasattr(attribute_cfg, "get") else None
            if not (isinstance(value, str) and value in names):
                return modelopt_set(self, attribute_cfg)
            if isinstance(attribute_cfg, dict):
                attribute_cfg = {**attribute_cfg, "calibrator": constructor(value)}
            else:
                attribute_cfg = attribute_cfg.model_copy(update={"calibrator": constructor(value)})
            modelopt_set(self, attribute_cfg)
            for attr in ("_num_bits", "_axis", "_unsigned"):  # what ModelOpt gives its own calibrators
                if hasattr(self, attr):
                    setattr(self._calibrator, attr, getattr(self, attr))

        return set_from_attribute_config

    _install("calibrator_constructor", TensorQuantizer, "set_from_attribute_config", make)


# ---------------------------------------------------------------------------------------------
# 3. max_calibrate: the "max" algorithm's entry (MaxCalibrateModeDescriptor._calib_func).  Our
#    dispatcher runs the whole-model grouped calibration or hands the call to ModelOpt's function.
#    Why not a mode of its own (``CalibrateModeRegistry.register_mode``, ModelOpt's supported way): a
#    calibration mode is chosen by the config's ``algorithm`` ("max" in every ModelOpt config), not by the
#    quantizers' ``calibrator``, so ``"calibrator": "triton_grouped"`` alone would never reach it; its
#    name would be recorded in ``mto.modelopt_state`` in place of "max_calibrate" (the saved state would
#    differ from max's); and ``register_mode`` refuses the existing name "max_calibrate".

MAX_CALIBRATE_PARAMS = [
    "model",
    "forward_loop",
    "distributed_sync",
    "sync_expert_weight_amax",
    "shared_states",
    "skip_forward_without_activation_calib",
]


def patch_max_calibrate(dispatch: Callable) -> None:
    """dispatch(modelopt_max, model, forward_loop, **options): ours, given ModelOpt's function to hand back to.

    ModelOpt's mode calls ``_calib_func(model, forward_loop=..., **config)``; the options are whatever
    the installed release's ``MaxCalibConfig`` has (no ``shared_states`` before 0.46).
    """
    from modelopt.torch.quantization.mode import MaxCalibrateModeDescriptor

    def make(modelopt_max):
        def max_calibrate(model, forward_loop=None, **options):
            return dispatch(modelopt_max, model, forward_loop, **options)

        return max_calibrate

    _install("max_calibrate", MaxCalibrateModeDescriptor, "_calib_func", make)


# ---------------------------------------------------------------------------------------------
# 4. weight_only_quantize: max_calibrate's weight loop (looked up by name at call time), replaced by the
#    grouped weight pass when ModelOpt's own max_calibrate runs (forward loop, hooks, other options).


def patch_weight_only_quantize(grouped_pass: Callable) -> None:
    """grouped_pass(modelopt_pass, model): ours, given ModelOpt's weight loop for the models it leaves to it."""
    from modelopt.torch.quantization import model_calib

    def make(modelopt_pass):
        def weight_only_quantize(model):
            return grouped_pass(modelopt_pass, model)

        return weight_only_quantize

    _install("weight_only_quantize", model_calib, "weight_only_quantize", make)


# ---------------------------------------------------------------------------------------------
# 5. distributed_sync and 6. moe_completeness: skip the per-quantizer all_reduce and the per-leaf
#    all_gather_object (ModelOpt #831/#862) for amaxes our one-collective-per-group reduction produced.


def patch_distributed_sync(already_synced: Callable[[object], bool]) -> None:
    from modelopt.torch.quantization import model_calib
    from modelopt.torch.quantization.nn import TensorQuantizer

    def make(modelopt_sync):
        def sync_amax_across_distributed_group(self, parallel_group):
            if not already_synced(self):
                modelopt_sync(self, parallel_group)

        return sync_amax_across_distributed_group

    _install("distributed_sync", TensorQuantizer, "sync_amax_across_distributed_group", make)

    def make_check(modelopt_check):
        def check_moe_calibration_complete(quantizer, parallel_state):
            for leaf in leaves(quantizer):
                if not (leaf._disabled or already_synced(leaf)):
                    modelopt_check(leaf, parallel_state)

        return check_moe_calibration_complete

    _install("moe_completeness", model_calib, "_check_moe_calibration_complete", make_check)


# ---------------------------------------------------------------------------------------------
# 7. checked_amax: ``mtq.calibrate`` validates every quantizer's ``_amax`` after the algorithm (three
#    reductions and host reads per quantizer).  An amax that the whole-model path wrote and checked in
#    one batch, and that is still the same tensor at the same version, is not checked again.

VALIDATE_ATTR_PARAMS = ["self", "attr_value", "attr_name", "raise_error", "warn_error", "name"]


def patch_validate_attr() -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer

    def make(modelopt_validate):
        def validate_attr(self, attr_value=None, attr_name="amax", raise_error=False, warn_error=False, name=""):
            if attr_value is None and attr_name == "_amax" and amax_still_checked(self):
                return True
            return modelopt_validate(self, attr_value, attr_name, raise_error, warn_error, name)

        return validate_attr

    _install("checked_amax", TensorQuantizer, "validate_attr", make)


def amax_buffer(quantizer) -> torch.Tensor | None:
    """The quantizer's registered ``_amax`` buffer (what ``validate_attr`` reads), or None."""
    return quantizer._buffers.get("_amax")


def mark_amax_checked(quantizer, amax: torch.Tensor) -> None:
    """Record that ``amax``, the quantizer's current ``_amax`` buffer, was found finite and non-negative."""
    quantizer._calibrator.checked_amax = (amax, amax._version)


def amax_still_checked(quantizer) -> bool:
    mark = getattr(quantizer.__dict__.get("_calibrator"), "checked_amax", None)
    if mark is None:
        return False
    amax = quantizer._buffers.get("_amax")
    return mark[0] is amax and amax._version == mark[1]


# ---------------------------------------------------------------------------------------------
# 8. modelopt_state_properties: ``TensorQuantizer._get_properties_for_modelopt_state`` builds a fresh
#    ``nn.Module()`` per quantizer (twice per quantizer in every ``mtq.calibrate``) to learn the
#    attribute names every module has; the names are the same each time, so they are taken once.


def patch_modelopt_state_properties() -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer

    module_attributes = frozenset(torch.nn.Module().__dict__)

    def make(modelopt_properties):
        def _get_properties_for_modelopt_state(self):
            return self.__dict__.keys() - module_attributes - self._skip_properties_for_save_restore

        return _get_properties_for_modelopt_state

    _install("modelopt_state_properties", TensorQuantizer, "_get_properties_for_modelopt_state", make)


# ---------------------------------------------------------------------------------------------
# Shared weight-amax states (``max_calibrate``'s q/k/v and gate/up groups, 0.46 and 0.47 only): what
# ModelOpt's ``SharedWeightGlobalAmaxState.attach`` and ``populate`` read and write, for ``shared_amax``.


def is_shared_state(module: torch.nn.Module) -> bool:
    """A ModelOpt shared quant state (left attached by an earlier calibration); never on 0.45."""
    if not shared_states_supported():
        return False
    from modelopt.torch.quantization.utils import SharedQuantState

    return isinstance(module, SharedQuantState)


def shared_patterns() -> list[str]:
    """The module-name patterns of the default q/k/v and gate/up groups (``SHARED_PATTERNS``)."""
    from modelopt.torch.quantization.utils import SharedWeightGlobalAmaxState

    return SharedWeightGlobalAmaxState.resolve_patterns(shared_states=None)


def enabled_weight_quantizer(module: torch.nn.Module):
    """The module's weight quantizer when ModelOpt's group discovery counts it (present, enabled), else None."""
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "_disabled") and not quantizer._disabled:
        return quantizer
    return None


def attach_group(parent: torch.nn.Module, members: list[torch.nn.Module]) -> torch.nn.Module:
    """What ``attach`` does for one group: a new state on ``parent`` (in its list of shared states,
    created as a submodule when it has none), its members set and its hooks installed."""
    from modelopt.torch.quantization.utils import SharedWeightGlobalAmaxState

    state = SharedWeightGlobalAmaxState()
    state.set_members(parent, members)
    states = getattr(parent, "_shared_quant_states", None)
    if states is None:
        states = torch.nn.ModuleList()
        parent._shared_quant_states = states
    states.append(state)
    state.install_hooks()
    return state


def fill_group(state: torch.nn.Module, global_amax: torch.Tensor, *, sync: bool) -> None:
    """What ``populate`` leaves on one state: its ``global_amax`` (own storage), synced over its members'
    EP and TP groups when ``sync`` (ModelOpt's own per-state sync), hooks removed."""
    state.global_amax = global_amax
    if sync:
        state.sync(next((ps for m in state.members if (ps := getattr(m, "parallel_state", None)) is not None), None))
    state.remove_hooks()


def calibrated_amax(quantizer) -> torch.Tensor | None:
    """The quantizer's ``_amax`` as ``SharedWeightGlobalAmaxState.finalize`` reads it (None when absent or meta)."""
    amax = getattr(quantizer, "_amax", None)
    return None if amax is None or amax.is_meta else amax


def scalar_amax(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's reduction of a per-channel amax to one value (``reduce_amax(amax, axis=None)``)."""
    from modelopt.torch.quantization.utils import reduce_amax

    return reduce_amax(amax, axis=None)


# ---------------------------------------------------------------------------------------------
# Quantizer and module accessors: the only reads and writes of ModelOpt private attributes.


def leaves(quantizer):
    """The TensorQuantizers inside a quantizer (itself, or the members of a Grouped/SequentialQuantizer)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    if isinstance(quantizer, TensorQuantizer):
        yield quantizer
    else:
        for q in quantizer:
            yield from leaves(q)


def calibrator(quantizer):
    return getattr(quantizer, "_calibrator", None)


def is_disabled(quantizer) -> bool:
    return quantizer._disabled


def axis(quantizer):
    return quantizer._axis


def has_amax(quantizer) -> bool:
    return getattr(quantizer, "_amax", None) is not None


def plain_max_collection(quantizer) -> bool:
    """Feeding a weight to this enabled quantizer under max calibration does nothing but collect.

    True when ``TensorQuantizer.forward`` in calibration mode would only call the calibrator: no
    pre-quant scale, rotation, static bias, static block reshaping, block-to-axis rewrite, dynamic or
    constant amax.  Then writing ``_amax`` and the two flags reproduces max calibration exactly.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    if type(quantizer) is not TensorQuantizer:
        return False
    state = quantizer.__dict__
    block_sizes = state.get("_block_sizes")
    if block_sizes is not None:
        if block_sizes.get("type", None) != "dynamic" and state.get("_fake_quant", True):
            return False  # static block quantization reshapes the input
        if all(v is None for k, v in block_sizes.items() if isinstance(k, int)):
            return False  # the forward rewrites per-channel block sizes into an axis
    return not (
        state.get("_dynamic", False)
        or state.get("_use_constant_amax", False)
        or state.get("_constant_amax") is not None
        or state.get("_bias") is not None
        or _pre_quant_scale_on(quantizer)
        or quantizer.rotate_is_enabled
    )


def _pre_quant_scale_on(quantizer) -> bool:
    return "_pre_quant_scale" in quantizer._buffers and quantizer.__dict__.get("_enable_pre_quant_scale", True)


def plain_when_disabled(quantizer) -> bool:
    """A disabled quantizer's forward only records the input dtype (no pre-quant scale or rotation)."""
    return not (_pre_quant_scale_on(quantizer) or quantizer.rotate_is_enabled)


def record_input_dtype(quantizer, weight: torch.Tensor) -> None:
    """What ``TensorQuantizer.forward`` leaves on a disabled quantizer it is fed (saved in its state)."""
    if weight.numel():
        quantizer.__dict__["_input_dtype"] = weight.dtype


def calibrator_amax(calibrator) -> torch.Tensor | None:
    """What a ``MaxCalibrator`` has collected so far (``compute_amax`` returns it)."""
    return calibrator._calib_amax


def set_calibrator_amax(quantizer, amax: torch.Tensor) -> None:
    """What ``MaxCalibrator.collect`` leaves in the calibrator (``compute_amax`` returns it)."""
    quantizer._calibrator._calib_amax = amax


def load_amax(quantizer, amax: torch.Tensor) -> None:
    """``finish_stats_collection`` for one quantizer: the calibrator's amax and the ``_amax`` buffer.

    ``amax`` is a fresh tensor: registered as is when the quantizer has no ``_amax`` yet (what ModelOpt's
    setter does after cloning), else copied into the existing buffer by ModelOpt's setter.
    """
    quantizer._calibrator._calib_amax = amax
    if "_amax" in quantizer._buffers or "_amax" in quantizer.__dict__:
        quantizer.amax = amax
    else:
        quantizer.register_buffer("_amax", amax)


def finish_flags(quantizer) -> None:
    """The flags ``enable_stats_collection`` + ``finish_stats_collection`` leave on an enabled quantizer.

    Plain attributes (not parameters, buffers, modules or tied shared state), so they are written
    where ``nn.Module.__setattr__`` would put them.
    """
    state = quantizer.__dict__
    state["_if_quant"] = True
    state["_if_calib"] = False


def weight_access_hook(module: torch.nn.Module) -> str | None:
    """Why ModelOpt would open a weight-access context for this module (FSDP2, offload, HF TP), or None."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        return "FSDP2"
    state = module.__dict__
    if "_hf_hook" in state:
        return "accelerate offload"
    if "_hf_tp_plan" in state:
        return "transformers tensor parallel"
    return None


def weight_access(module, model, name_to_module: dict | None) -> AbstractContextManager:
    """ModelOpt's weight-access context for a module under a hook; nothing otherwise."""
    if name_to_module is None:
        return nullcontext()
    from modelopt.torch.quantization.utils import enable_weight_access_and_writeback

    return enable_weight_access_and_writeback(module, model, name_to_module)


def sync_local_experts_amax(model: torch.nn.Module) -> None:
    """``max_calibrate``'s SequentialMLP step, which gives a local expert left without amax one from its weight."""
    for module in model.modules():
        if hasattr(module, "layer_sync_moe_local_experts_amax"):
            module.layer_sync_moe_local_experts_amax(sync_weight_amax=False)


def finalize_shared_state(model: torch.nn.Module) -> None:
    """The shared-state part of ``max_calibrate``'s ending (``_finalize_with_shared_state`` less the
    static-block promotion and its check, which concern static NVFP4 quantizers only).  Nothing on 0.45."""
    if not shared_states_supported():
        return
    from modelopt.torch.quantization.utils import SharedWeightGlobalAmaxState

    SharedWeightGlobalAmaxState.populate(model)


def attach_shared_state(model: torch.nn.Module) -> None:
    """``max_calibrate``'s first step: discover the q/k/v and gate/up groups (recorded in metadata).  Nothing
    on 0.45, whose ``max_calibrate`` has no such step."""
    if not shared_states_supported():
        return
    from modelopt.torch.quantization.utils import SharedWeightGlobalAmaxState

    SharedWeightGlobalAmaxState.attach(model, patterns=shared_patterns())


def quantized_data(qtensor) -> torch.Tensor:
    """The packed codes a ModelOpt ``QTensor`` holds (what its exporter writes)."""
    return qtensor._quantized_data


def quantizer_stand_in(amax: torch.Tensor, block_sizes: dict) -> SimpleNamespace:
    """The two attributes ModelOpt's NVFP4 export reads from a weight quantizer (``_amax``, ``block_sizes``)."""
    return SimpleNamespace(_amax=amax, block_sizes=block_sizes)

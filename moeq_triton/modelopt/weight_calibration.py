"""Whole-model weight calibration for ``triton_grouped`` quantizers: one walk, one grouped launch per dtype.

ModelOpt's ``max`` calibration feeds every weight through its quantizer's forward inside a per-module
weight-access context (a name scan that grows with the square of the module count) and then walks
the model several more times.  When every enabled quantizer is a ``triton_grouped`` weight quantizer
and no forward loop, weight-access hook or special option is involved, ``max_calibrate`` below does the
whole job in one walk and leaves exactly what ModelOpt's ``max`` leaves; otherwise it runs ModelOpt's
own ``max_calibrate``, whose weight loop is then ``grouped_weight_only_quantize``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from moeq_triton.distributed import active
from moeq_triton.modelopt import patches as mo
from moeq_triton.modelopt import shared_amax
from moeq_triton.modelopt.calibrator import (
    Calibrated,
    TritonGroupedCalibrator,
    WeightBatch,
    reduction_view,
    set_last_stats,
)
from moeq_triton.modelopt.names import CALIBRATOR
from moeq_triton.modelopt.sync_groups import rank_groups, sync_groups


@dataclass(kw_only=True)
class ModelWalk:
    """One pass over ``named_modules()``: what the calibration needs to know about the model."""

    quant_modules: list[tuple[str, torch.nn.Module]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # id(module) -> qualified name
    leaves: list[torch.nn.Module] = field(default_factory=list)  # every TensorQuantizer
    ours: int = 0  # enabled quantizers with a triton_grouped calibrator
    hook: str | None = None  # the first weight-access hook found (FSDP2, offload, HF TP)
    modules: list[tuple[str, torch.nn.Module]] = field(default_factory=list)  # named_modules(), in order
    parents: dict[int, torch.nn.Module] = field(default_factory=dict)  # id(child) -> parent (the last one)
    shared_states: int = 0  # ModelOpt shared quant states already attached (an earlier calibration)


def walk(model: torch.nn.Module) -> ModelWalk:
    from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer

    found = ModelWalk()
    found.modules = list(model.named_modules())
    parents = found.parents
    for name, module in found.modules:
        found.names[id(module)] = name
        for child in module.children():
            parents[id(child)] = module
        if isinstance(module, TensorQuantizer):
            found.leaves.append(module)
            if isinstance(mo.calibrator(module), TritonGroupedCalibrator) and not mo.is_disabled(module):
                found.ours += 1
        elif isinstance(module, QuantModule):
            found.quant_modules.append((name, module))
        elif mo.is_shared_state(module):
            found.shared_states += 1
        if found.hook is None:
            found.hook = mo.weight_access_hook(module)
    return found


@dataclass
class PathTaken:
    """Which code calibrated the weights last: "whole-model" (ours) or "modelopt", and why not ours."""

    path: str = ""
    reason: str | None = None


LAST_PATH = PathTaken()


def _took(path: str, reason: str | None = None) -> None:
    LAST_PATH.path, LAST_PATH.reason = path, reason


class _NotPlain(Exception):
    """A quantizer that the fast path cannot reproduce exactly: ModelOpt's max_calibrate runs instead."""


def _feed(model: torch.nn.Module, found: ModelWalk, fast: bool, member_of) -> tuple[list[Calibrated], list[str]]:
    """Feed every weight ModelOpt's weight loop would feed; ours are recorded and reduced in one batch.

    fast: no enable_stats_collection ran, and ``fast_path_refusal`` found every enabled quantizer plain
    and ours; a quantizer that still cannot be reproduced exactly raises _NotPlain before any amax is
    written.  Otherwise the quantizers are in ModelOpt's calibration mode and what is not ours (or not
    groupable) goes through its own forward.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    batch = WeightBatch()
    fed: set[int] = set()
    contexts = dict(model.named_modules()) if found.hook is not None else None
    for module_name, module in found.quant_modules:
        per_tensor: list[tuple] = []  # this module's per-tensor pairs: stacked expert slices are taken whole
        with mo.weight_access(module, model, contexts):
            for weight, quantizer in module.iter_weights_for_calibration():
                if type(quantizer) is not TensorQuantizer:  # SequentialQuantizer and the like
                    if fast:
                        raise _NotPlain(found.names.get(id(quantizer)))
                    quantizer(weight)
                    fed.update(id(q) for q in mo.leaves(quantizer))
                    continue
                fed.add(id(quantizer))
                calibrator = mo.calibrator(quantizer)
                disabled = mo.is_disabled(quantizer)
                if disabled and fast:
                    if not mo.plain_when_disabled(quantizer):
                        raise _NotPlain(found.names.get(id(quantizer)))
                    mo.record_input_dtype(quantizer, weight)
                    continue
                axis = mo.axis(quantizer)
                if (
                    not disabled
                    and isinstance(calibrator, TritonGroupedCalibrator)
                    and weight.device.type != "meta"
                    and (fast or mo.plain_max_collection(quantizer))
                    and reduction_view(axis, weight) is not None
                ):
                    if weight.numel():  # TensorQuantizer.forward returns early on an empty tensor
                        groups = sync_groups(module, module_name, axis, calibrator.shared)
                        name = found.names[id(quantizer)]
                        if axis is None:
                            per_tensor.append((quantizer, name, weight, groups))
                        else:
                            batch.add(quantizer, name, weight, per_channel=True, groups=groups)
                elif fast:
                    raise _NotPlain(found.names.get(id(quantizer)))
                else:
                    quantizer(weight)  # ModelOpt's own collection (its calibrator, in calibration mode)
            _add_per_tensor(batch, per_tensor)
            if contexts is not None:  # the weights are materialized only inside this module's context
                batch.settle()
                weight = per_tensor = None  # no reference outlives the context (the next module may feed none)
    entries = batch.reduce(member_of)
    missing = [
        found.names[id(q)]
        for q in found.leaves
        if id(q) not in fed
        and not mo.is_disabled(q)
        and isinstance(mo.calibrator(q), TritonGroupedCalibrator)
        and "weight_quantizer" in found.names[id(q)]
    ]
    return entries, missing


def _add_per_tensor(batch: WeightBatch, pairs: list[tuple]) -> None:
    """Add one module's per-tensor pairs; a run that covers every slice ``base[0] .. base[E-1]`` of one
    contiguous stacked parameter (fused experts) becomes one stacked entry."""
    start = 0
    while start < len(pairs):
        base = pairs[start][2]._base
        size = base.shape[0] if base is not None and base.dim() == pairs[start][2].dim() + 1 else 0
        run = pairs[start : start + size]
        if size > 1 and len(run) == size and _is_every_slice(base, [w for _, _, w, _ in run]):
            batch.add_stack(run, base)
            start += size
        else:
            quantizer, name, weight, groups = pairs[start]
            batch.add(quantizer, name, weight, per_channel=False, groups=groups)
            start += 1


def _is_every_slice(base: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """weights[i] is base[i] for every i, and base is contiguous (so it views as [E, -1])."""
    if not base.is_contiguous():
        return False
    step = base.stride(0) * base.element_size()
    first = base.data_ptr()
    return all(
        w._base is base and w.data_ptr() == first + i * step and w.shape == base.shape[1:] and w.is_contiguous()
        for i, w in enumerate(weights)
    )


def _report(entries: list[Calibrated], missing: list[str]) -> None:
    set_last_stats(entries, missing)
    if missing:
        warnings.warn(
            f"{len(missing)} weight quantizer(s) using {CALIBRATOR!r} received no weight from "
            f"iter_weights_for_calibration() and stay uncalibrated: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else ""),
            stacklevel=3,
        )


@torch.no_grad()
def grouped_weight_only_quantize(modelopt_pass, model: torch.nn.Module) -> None:
    """ModelOpt's ``weight_only_quantize`` inside its own ``max_calibrate``, with one grouped flush.

    modelopt_pass: ModelOpt's own weight loop (the patch hands it over), run when no quantizer is ours.
    The quantizers are in calibration mode; ModelOpt's ``finish_stats_collection`` loads the amaxes
    from the calibrators afterwards, and its per-quantizer sync skips the ones reduced here.
    """
    found = walk(model)
    if not found.ours:
        return modelopt_pass(model)
    member_of = rank_groups()
    entries, missing = _feed(model, found, fast=False, member_of=member_of)
    for entry in entries:
        mo.set_calibrator_amax(entry.quantizer, entry.amax)
        mo.calibrator(entry.quantizer).synced = member_of is not None
    _report(entries, missing)


def fast_path_refusal(found: ModelWalk, forward_loop, sync_expert_weight_amax: bool, shared_states) -> str | None:
    """Why the whole-model path does not apply (then ModelOpt's max_calibrate runs), or None."""
    if forward_loop is not None:
        return "a forward loop is given"
    if found.hook is not None:
        return f"a weight-access hook is present ({found.hook})"
    if sync_expert_weight_amax or shared_states is not None:
        return "sync_expert_weight_amax or shared_states is set"
    distributed = active()
    for q in found.leaves:
        if mo.is_disabled(q):
            if distributed and mo.has_amax(q):
                return f"disabled quantizer {found.names[id(q)]} holds an amax that ModelOpt would sync"
            continue
        if not (isinstance(mo.calibrator(q), TritonGroupedCalibrator) and mo.plain_max_collection(q)):
            return f"quantizer {found.names[id(q)]} is not a plain {CALIBRATOR!r} weight quantizer"
    return None


@torch.no_grad()
def max_calibrate(
    modelopt_max,
    model: torch.nn.Module,
    forward_loop=None,
    distributed_sync: bool = True,
    sync_expert_weight_amax: bool = False,
    **newer,
) -> None:
    """The "max" algorithm: the whole-model grouped path when it applies, else ModelOpt's ``max_calibrate``.

    modelopt_max: ModelOpt's own function (the patch hands it over).  newer: the options of the releases
    that have them (0.46 on: ``shared_states``, ``skip_forward_without_activation_calib``), passed on as given.
    """

    def modelopt(reason: str) -> None:
        _took("modelopt", reason)
        return modelopt_max(
            model,
            forward_loop=forward_loop,
            distributed_sync=distributed_sync,
            sync_expert_weight_amax=sync_expert_weight_amax,
            **newer,
        )

    found = walk(model)
    refusal = fast_path_refusal(found, forward_loop, sync_expert_weight_amax, newer.get("shared_states"))
    if not found.ours or refusal:
        return modelopt(refusal or f"no enabled {CALIBRATOR!r} quantizer")
    member_of = rank_groups() if distributed_sync else None
    try:
        entries, missing = _feed(model, found, fast=True, member_of=member_of)
    except _NotPlain as error:
        return modelopt(f"quantizer {error} is fed in a way only ModelOpt's forward reproduces")
    _took("whole-model")
    # max_calibrate's first step (0.46 on), which depends on the module tree only: the q/k/v and gate/up
    # groups (ModelOpt's own attach when an earlier calibration left states to reuse)
    states = mo.shared_states_supported()
    groups = shared_amax.attach(model, found.modules, found.parents) if states and not found.shared_states else None
    if states and groups is None:
        mo.attach_shared_state(model)
    for q in found.leaves:
        if not mo.is_disabled(q):
            mo.finish_flags(q)
    synced = member_of is not None
    for entry in entries:
        mo.load_amax(entry.quantizer, entry.amax)
        mo.calibrator(entry.quantizer).synced = synced
    _mark_checked(entries)
    if missing:  # ModelOpt's SequentialMLP step calibrates an expert left without amax from its weight
        mo.sync_local_experts_amax(model)
    # max_calibrate's ending (0.46 on): the q/k/v and gate/up shared states take the max of their members'
    # amax (a non-persistent buffer, synced over EP/TP).  Promotion (and 0.45's grouped global-amax sync)
    # touches static-block NVFP4 quantizers only, and none is on this path.
    if states and (groups is None or not shared_amax.populate(groups)):
        mo.finalize_shared_state(model)
    _report(entries, missing)


def _mark_checked(entries: list[Calibrated]) -> None:
    """What ``mtq.calibrate`` checks afterwards quantizer by quantizer (every ``_amax`` finite and >= 0),
    in one reduction per dtype; the buffers that pass are not checked again (``checked_amax`` patch)."""
    buffers = [(e.quantizer, amax) for e in entries if (amax := mo.amax_buffer(e.quantizer)) is not None]
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for _, amax in buffers:
        by_kind.setdefault((amax.dtype, amax.device, amax.dim() == 0), []).append(amax)
    for (_, _, scalar), amaxes in by_kind.items():
        values = torch.stack(amaxes) if scalar else torch.cat([a.reshape(-1) for a in amaxes])
        if not bool((values.isfinite() & (values >= 0)).all()):
            return  # ModelOpt's own check names the offending quantizers
    for quantizer, amax in buffers:
        mo.mark_amax_checked(quantizer, amax)

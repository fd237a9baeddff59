"""The q/k/v and gate/up shared weight-amax states that ``max_calibrate`` leaves, built from one walk.

ModelOpt (0.46 on) ``SharedWeightGlobalAmaxState.attach`` and ``populate`` look up every module's quantizer by
attribute and fill each group with several small tensor operations (a quarter of the whole-model path at
one module per expert); this builds the same states on the same parents and fills them with one reduction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from moeq_triton.distributed import active
from moeq_triton.modelopt import patches as mo

_TAIL = re.compile(r"\(\?:\(\.\*\)\\\.\)\?\(\?:([\w|]+)\)")  # "(?:(.*)\.)?(?:a|b)": names ending in .a or .b
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class SharedGroup:
    """One attached state: its members' weight quantizers, in member order."""

    state: nn.Module
    quantizers: list


def pattern_tails(patterns: list[str]) -> frozenset[str] | None:
    """The last name component every module matching one of the patterns has; None when a pattern is
    not of the ``(?:(.*)\\.)?(?:a|b)`` form (then every module name is matched against the patterns)."""
    names: set[str] = set()
    for pattern in patterns:
        match = _TAIL.fullmatch(pattern)
        if match is None:
            return None
        names.update(match.group(1).split("|"))
    return frozenset(names)


def _ancestors(module: nn.Module, parents: dict[int, nn.Module]) -> list[nn.Module]:
    chain = []
    while id(module) in parents:
        module = parents[id(module)]
        chain.append(module)
    return chain


def _group_parent(members: list[nn.Module], parents: dict[int, nn.Module], model: nn.Module) -> nn.Module:
    """The deepest common ancestor of the members that is not a ModuleList (ModelOpt's placement rule)."""
    chains = [_ancestors(m, parents) for m in members]
    if not chains[0]:
        return model
    common = {id(a) for a in chains[0]}
    for chain in chains[1:]:
        common &= {id(a) for a in chain}
    for ancestor in chains[0]:
        if id(ancestor) in common:
            while isinstance(ancestor, nn.ModuleList):
                parent = parents.get(id(ancestor))
                if parent is None or parent is ancestor:
                    return model
                ancestor = parent
            return ancestor
    return model


def attach(model: nn.Module, modules: list[tuple[str, nn.Module]], parents: dict[int, nn.Module]) -> list[SharedGroup]:
    """``SharedWeightGlobalAmaxState.attach(model, SHARED_PATTERNS)`` on a model that has no shared state yet.

    modules: ``model.named_modules()`` in order; parents: id(child) -> parent, as ``model.modules()``
    and ``children()`` give them.  Groups are the modules with an enabled weight quantizer whose names
    give one pattern the same captures (first matching pattern wins), two or more per group.
    """
    patterns = mo.shared_patterns()
    compiled = [re.compile(p) for p in patterns]
    last_names = pattern_tails(patterns)
    buckets: dict[tuple, list[tuple[nn.Module, object]]] = {}
    for name, module in modules:
        if last_names is not None and name.rpartition(".")[2] not in last_names:
            continue
        for index, regex in enumerate(compiled):
            match = regex.fullmatch(name)
            if match is not None:
                quantizer = mo.enabled_weight_quantizer(module)
                if quantizer is not None:
                    buckets.setdefault((index, match.groups()), []).append((module, quantizer))
                break
    groups = []
    for pairs in buckets.values():
        if len(pairs) < 2:
            continue
        members = [m for m, _ in pairs]
        state = mo.attach_group(_group_parent(members, parents, model), members)
        groups.append(SharedGroup(state, [q for _, q in pairs]))
    return groups


@torch.no_grad()
def populate(groups: list[SharedGroup]) -> bool:
    """``SharedWeightGlobalAmaxState.populate`` for the attached groups: each group's ``global_amax`` is
    the max of its members' amaxes, float32, in its own storage; groups without any amax stay empty.

    Returns False (nothing written) when the amaxes are not the plain case (several devices, another
    dtype, NaN); the caller then runs ModelOpt's own populate.
    """
    scalars: list[torch.Tensor] = []
    group_of: list[int] = []
    for i, group in enumerate(groups):
        for quantizer in group.quantizers:
            amax = mo.calibrated_amax(quantizer)
            if amax is not None:
                scalars.append(amax if amax.dim() == 0 else mo.scalar_amax(amax))
                group_of.append(i)
    if not scalars:
        return True
    devices = {s.device for s in scalars}
    dtypes = {s.dtype for s in scalars}
    if len(devices) > 1 or not dtypes <= set(_FLOAT_DTYPES):
        return False
    (device,) = devices
    if len(dtypes) == 1:
        values = torch.stack(scalars).float()
    else:
        values = torch.stack([s.float() for s in scalars])
    values = values.abs()  # reduce_amax of a 0-dim amax: max(|a|, |a|)
    if bool(values.isnan().any()):
        return False
    index = torch.tensor(group_of, device=device)
    maxima = torch.zeros(len(groups), dtype=torch.float32, device=device)
    maxima.scatter_reduce_(0, index, values, reduce="amax", include_self=False)
    filled = sorted(set(group_of))
    for i, value in zip(filled, maxima[filled].unbind()):
        mo.fill_group(groups[i].state, value.clone(), sync=active())
    return True

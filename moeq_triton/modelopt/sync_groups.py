"""Which process groups a weight amax must agree over, by ModelOpt's own sync rules.

ModelOpt syncs each quantizer over data, expert and tensor parallel groups under conditions spread
through ``max_calibrate``; here they are written once, beside the collectives that carry them out.
"""

from __future__ import annotations

import torch

from moeq_triton.distributed import DATA, EXPERT, TENSOR, Group, active


def is_routed_expert(module_name: str) -> bool:
    """A routed expert (different tensors on different EP ranks), not a shared expert."""
    return "experts" in module_name and "shared_experts" not in module_name


def sync_groups(module: torch.nn.Module, module_name: str, axis, shared: bool) -> tuple[Group, ...]:
    """The groups a weight quantizer's amax must agree over.

    Data parallel always; tensor parallel for a column-parallel weight (per tensor) or a row-parallel
    weight (per tensor or per output channel: its rows are split along K); expert parallel only for
    non-routed weights or in the shared-scale mode (routed experts on other EP ranks are other tensors).
    Expert modules carry Megatron's expert-data / expert-tensor groups in their ``parallel_state``.
    """
    if not active():
        return ()
    state = getattr(module, "parallel_state", None)
    if state is None:
        return ((DATA, None),)  # torch.distributed without Megatron: the world group
    groups: list[Group] = []
    if state.data_parallel_group.is_initialized():
        groups.append((DATA, state.data_parallel_group.group))
    from modelopt.torch.quantization.utils import (
        is_quantized_column_parallel_linear,
        is_quantized_row_parallel_linear,
    )

    split = (is_quantized_column_parallel_linear(module) and axis is None) or (
        is_quantized_row_parallel_linear(module) and axis in (None, 0)
    )
    if split and state.tensor_parallel_group.is_initialized():
        groups.append((TENSOR, state.tensor_parallel_group.group))
    if (not is_routed_expert(module_name) or shared) and state.expert_model_parallel_group.is_initialized():
        groups.append((EXPERT, state.expert_model_parallel_group.group))
    return tuple(groups)


def rank_groups() -> tuple[Group, ...] | None:
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

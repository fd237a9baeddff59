"""A tests-only stand-in for Transformer Engine's GroupedLinear as ModelOpt 0.47 quantizes it.

Transformer Engine cannot be installed on these machines.  This module reproduces the contract of
ModelOpt's ``_QuantTEGroupedLinear`` (plugins/transformer_engine.py) that calibration touches, and
nothing else: parameters ``weight0 .. weight{num_gemms-1}`` (each [out, in]), ``weight_quantizer``
a ``GroupedQuantizer`` with one TensorQuantizer per expert (0.47, PR #1550; ``shared_quantizer=True``
gives the pre-0.47 single quantizer, which is what the stand-in builds on 0.45 and 0.46), and
``iter_weights_for_calibration()`` yielding
``(weight_i, weight_quantizer[i])``.  The forward is a plain per-expert matmul (TE's fused grouped
GEMM is not part of the contract).
"""

from __future__ import annotations

import torch
from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer
from torch import nn

try:
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import GroupedQuantizer
except ImportError:  # ModelOpt < 0.47: one weight quantizer for all experts of a GroupedLinear
    GroupedQuantizer = None

PER_EXPERT_QUANTIZERS = GroupedQuantizer is not None


class GroupedLinearStandIn(nn.Module):
    """num_gemms expert weights held as separate parameters, like te.pytorch.GroupedLinear."""

    def __init__(
        self,
        num_gemms: int,
        in_features: int,
        out_features: int,
        shared_quantizer: bool = False,
        parallel: str | None = None,
    ):
        super().__init__()
        self.num_gemms = num_gemms
        # Megatron's ColumnParallel / RowParallel flags, as ModelOpt's megatron plugin sets them.
        self._is_column_parallel = parallel == "column"
        self._is_row_parallel = parallel == "row"
        self.shared_quantizer = shared_quantizer
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", nn.Parameter(torch.randn(out_features, in_features)))

    def forward(self, x: torch.Tensor, m_splits: list[int]) -> torch.Tensor:
        chunks = x.split(m_splits)
        return torch.cat([c @ getattr(self, f"weight{i}").t() for i, c in enumerate(chunks)])


@QuantModuleRegistry.register({GroupedLinearStandIn: "GroupedLinearStandIn"})
class QuantGroupedLinearStandIn(QuantModule):
    # Tests set this to hand the module its process groups, as Megatron's plugin does in _setup.
    parallel_state_factory = None

    def _setup(self):
        if type(self).parallel_state_factory is not None:
            self.parallel_state = type(self).parallel_state_factory()
        if self.shared_quantizer or not PER_EXPERT_QUANTIZERS:
            self.weight_quantizer = TensorQuantizer()
        else:
            self.weight_quantizer = GroupedQuantizer(*[TensorQuantizer() for _ in range(self.num_gemms)])
        self.input_quantizer = TensorQuantizer()
        self.output_quantizer = TensorQuantizer()
        self.output_quantizer.disable()

    def iter_weights_for_calibration(self):
        grouped = PER_EXPERT_QUANTIZERS and isinstance(self.weight_quantizer, GroupedQuantizer)
        for i in range(self.num_gemms):
            weight_i = getattr(self, f"weight{i}", None)
            if weight_i is not None:
                yield weight_i, (self.weight_quantizer[i] if grouped else self.weight_quantizer)


class GroupedMoEStandIn(nn.Module):
    """layers x {linear_fc1, linear_fc2} grouped linears, named like Megatron's TEGroupedMLP."""

    def __init__(
        self,
        layers: int,
        experts: int,
        hidden: int = 32,
        ffn: int = 16,
        shared_quantizer: bool = False,
        tensor_parallel: int = 1,
    ):
        """tensor_parallel > 1 builds one TP rank's slices: fc1 rows and fc2 columns divided by it."""
        super().__init__()
        self.layers = nn.ModuleList()
        out1, in2 = 2 * ffn // tensor_parallel, ffn // tensor_parallel
        for _ in range(layers):
            mlp = nn.Module()
            mlp.experts = nn.Module()
            mlp.experts.linear_fc1 = GroupedLinearStandIn(experts, hidden, out1, shared_quantizer, "column")
            mlp.experts.linear_fc2 = GroupedLinearStandIn(experts, in2, hidden, shared_quantizer, "row")
            layer = nn.Module()
            layer.mlp = mlp
            self.layers.append(layer)

"""The embedded default job: quantize one synthetic MoE layer's experts and show what came out.

It needs nothing downloaded: the layer is generated deterministically (heavy-tailed weights with
outlier channels, Qwen3-MoE layout scaled down), quantized in grouped calls and checked by
dequantizing.  It is a demonstration, not a model: the numbers say so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from moeq_triton.checkpoint.job import relative_error
from moeq_triton.kernels import (
    dequantize_nvfp4_reference,
    grouped_amax,
    launch_counts,
    quantize_fp8,
    quantize_nvfp4,
    reset_launch_counts,
    use_triton,
)
from moeq_triton.synthetic import heavy_tailed


@dataclass(frozen=True)
class SyntheticMoELayer:
    """Shape of the generated layer (Qwen3-MoE layout: fused gate+up fc1, down fc2 per expert)."""

    experts: int = 16
    hidden: int = 512
    moe_intermediate: int = 192
    seed: int = 0

    def weights(self, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked fc1 [E, 2I, H] and fc2 [E, H, I]: cubed normals, a few 30x outlier input channels."""
        gen = torch.Generator().manual_seed(self.seed)
        shapes = (
            (self.experts, 2 * self.moe_intermediate, self.hidden),
            (self.experts, self.hidden, self.moe_intermediate),
        )
        fc1, fc2 = (heavy_tailed(s, gen, dtype, scale=0.02, outlier_columns=4) for s in shapes)
        return fc1, fc2


def run_demo(device: str = "cpu", console: Console | None = None) -> dict[str, float]:
    """Quantize every expert weight of the synthetic layer to NVFP4 and FP8; print a table."""
    console = console or Console()
    layer = SyntheticMoELayer()
    fc1, fc2 = (w.to(device) for w in layer.weights())
    weights = [*fc1.unbind(0), *fc2.unbind(0)]  # views: no stacking copy, no per-expert copy
    engine = "Triton" if use_triton(fc1.device) else "torch reference (no GPU, TRITON_INTERPRET unset)"
    console.print(
        f"[bold]moeq-triton demo[/bold]: a SYNTHETIC Qwen3-MoE-style layer ({layer.experts} experts, "
        f"fc1 {tuple(fc1.shape[1:])}, fc2 {tuple(fc2.shape[1:])}, bf16, seed {layer.seed}) on {device}; "
        f"kernels: {engine}"
    )
    bytes_in = sum(w.numel() * w.element_size() for w in weights)
    reset_launch_counts()
    rows = []
    start = time.perf_counter()
    amax = grouped_amax(weights)
    nvfp4 = quantize_nvfp4(weights, amax)
    nvfp4_seconds = time.perf_counter() - start
    deq = [dequantize_nvfp4_reference(q) for q in nvfp4]
    rows.append(("NVFP4 (W4A16)", nvfp4, nvfp4_seconds, _relative_errors(weights, deq)))

    start = time.perf_counter()
    fp8 = quantize_fp8(weights, amax)
    fp8_seconds = time.perf_counter() - start
    deq = [q.weight.float() * q.weight_scale for q in fp8]
    rows.append(("FP8 per tensor", fp8, fp8_seconds, _relative_errors(weights, deq)))

    table = Table(title=f"{len(weights)} expert weights, {bytes_in / 1e6:.1f} MB in (bf16)")
    for column in ("format", "tensors", "MB out", "seconds", "MB/s", "max rel. err", "mean rel. err"):
        table.add_column(column, justify="right")
    summary = {}
    for name, results, seconds, (max_err, mean_err) in rows:
        out = sum(t.numel() * t.element_size() for r in results for t in r)
        table.add_row(
            name,
            str(len(results)),
            f"{out / 1e6:.2f}",
            f"{seconds:.3f}",
            f"{bytes_in / 1e6 / seconds:.0f}",
            f"{max_err:.2e}",
            f"{mean_err:.2e}",
        )
        summary[name] = mean_err
    console.print(table)
    launches = launch_counts()
    console.print(f"Triton launches: {launches if launches else 'none (torch reference path)'}")
    console.print("Relative error = |dequantized - w| / max|w| per tensor (max and mean over elements).")
    return summary


def _relative_errors(weights: list[torch.Tensor], dequantized: list[torch.Tensor]) -> tuple[float, float]:
    """Max and mean (over all elements of all tensors) of ``relative_error``'s per-tensor figures."""
    errors = [relative_error(w, d) for w, d in zip(weights, dequantized)]
    sizes = [w.numel() for w in weights]
    return max(e[0] for e in errors), sum(e[1] * n for e, n in zip(errors, sizes)) / sum(sizes)

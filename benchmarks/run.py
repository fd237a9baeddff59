"""Throughput of the grouped kernels next to the speed of light of a read pass.

    python benchmarks/run.py [--quick] [--model Qwen3-30B-A3B] [--layers N] [--experts E]

Rows: grouped_amax, quantize_nvfp4, quantize_fp8 over one model's expert stack (separate per-expert
views, as a rank holds them), and torch's own amax over ONE contiguous tensor of the same bytes (the
speed of light for a read pass).  GPU: triton.testing.do_bench medians, inputs rotated through
buffers larger than L2.  CPU: the torch reference path at small sizes; those are CPU figures, not
GPU claims, and the table says so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from moeq_triton.kernels import grouped_amax, quantize_fp8, quantize_nvfp4, use_triton
from rich.console import Console
from rich.table import Table

from moeq_triton.model_shapes import MODEL_SHAPES


def expert_views(shape, layers: int, experts: int, device: str, copies: int) -> list[list[torch.Tensor]]:
    """`copies` independent expert stacks (to rotate through, defeating L2), each a list of views."""
    sets = []
    for c in range(copies):
        gen = torch.Generator(device=device).manual_seed(c)
        views = []
        for _ in range(layers):
            for n, k in (shape.fc1, shape.fc2):
                stacked = torch.randn(experts, n, k, generator=gen, device=device, dtype=torch.bfloat16)
                views.extend(stacked.unbind(0))
        sets.append(views)
    return sets


def median_seconds(fn: Callable[[int], object], device: str, reps: int) -> float:
    """Median wall time of fn(i) for rotating i; CUDA via do_bench (events, warm-up, L2 flush)."""
    if device == "cuda":
        import triton.testing

        counter = iter(range(1 << 30))
        return triton.testing.do_bench(lambda: fn(next(counter)), return_mode="median") / 1e3
    fn(0)  # warm-up
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI on CPU)")
    parser.add_argument("--model", default="Qwen3-30B-A3B", choices=[m.name for m in MODEL_SHAPES])
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    shape = next(m for m in MODEL_SHAPES if m.name == args.model)
    gpu = args.device == "cuda"
    layers = args.layers or (1 if args.quick or not gpu else 4)
    experts = args.experts or (4 if args.quick else (shape.experts if gpu else 16))
    copies = 3 if gpu else 1
    reps = 3 if args.quick else 10
    sets = expert_views(shape, layers, experts, args.device, copies)
    elements = sum(w.numel() for w in sets[0])
    read = elements * 2
    flat = [torch.randn(elements, device=args.device, dtype=torch.bfloat16) for _ in range(copies)]

    def pick(i: int) -> list[torch.Tensor]:
        return sets[i % copies]

    amaxes = [grouped_amax(s) for s in sets]
    cases = [
        ("torch aminmax, one contiguous tensor (speed of light)", read, lambda i: torch.aminmax(flat[i % copies])),
        ("grouped_amax", read, lambda i: grouped_amax(pick(i))),
        (
            "quantize_nvfp4 (amax given)",
            read + elements * (0.5 + 1 / 16),
            lambda i: quantize_nvfp4(pick(i), amaxes[i % copies]),
        ),
        ("quantize_fp8 (amax given)", read + elements, lambda i: quantize_fp8(pick(i), amaxes[i % copies])),
    ]
    engine = "Triton" if use_triton(torch.device(args.device)) else "torch reference (CPU figures, not GPU claims)"
    table = Table(
        title=f"{shape.name} experts: {layers} layer(s) x {experts} experts x (fc1 {shape.fc1} + fc2 {shape.fc2}), "
        f"bf16, {read / 1e9:.3f} GB; {args.device}, kernels: {engine}"
    )
    for column in ("row", "GB moved", "median ms", "GB/s", "x speed of light"):
        table.add_column(column, justify="right")
    sol = None
    for name, moved, fn in cases:
        seconds = median_seconds(fn, args.device, reps)
        gbps = moved / seconds / 1e9
        sol = sol or read / seconds / 1e9
        table.add_row(name, f"{moved / 1e9:.3f}", f"{seconds * 1e3:.2f}", f"{gbps:.1f}", f"{gbps / sol:.2f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()

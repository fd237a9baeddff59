"""Measure each kernel's tile choices (rows x cols x warps) on the GPU; every choice is checked bitwise first.

    python -m benchmarks.tile_sweep [--model Qwen3-235B-A22B] [--out DIR]

Writes DIR/tiles.json with the fastest choice per kernel (python -m benchmarks.run --tiles applies it) and prints
a table of GB/s per choice last.  The defaults live in each kernel module's TILES["cuda"].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.run import TILE_MODULES, bytes_moved, check_kernels, expert_views, median_seconds
from moeq_triton.kernels import grouped_amax, quantize_fp8, quantize_nvfp4
from moeq_triton.kernels.grouping import Tiles
from moeq_triton.testing import MODEL_SHAPES

ROW_TILES = [(16, 256, 4), (8, 512, 4), (16, 512, 8), (4, 1024, 4), (32, 256, 8)]
BLOCK_TILES = [(16, 8, 4), (8, 16, 4), (16, 16, 8), (32, 8, 8), (4, 32, 4)]
CHOICES = {"grouped_amax": ROW_TILES, "quantize_nvfp4": BLOCK_TILES, "quantize_fp8": ROW_TILES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen3-235B-A22B", choices=[m.name for m in MODEL_SHAPES])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shape = next(m for m in MODEL_SHAPES if m.name == args.model)
    weights = expert_views(shape, 1, shape.experts, "cuda")
    amax = grouped_amax(weights)
    calls = {
        "grouped_amax": lambda: grouped_amax(weights),
        "quantize_nvfp4": lambda: quantize_nvfp4(weights, amax),
        "quantize_fp8": lambda: quantize_fp8(weights, amax),
    }
    console = Console(width=160)
    console.print(f"tile sweep, {shape.name} experts (1 layer, {bytes_moved('amax', weights) / 1e9:.2f} GB bf16)")
    rows: list[tuple[str, str, float, float]] = []
    best: dict[str, tuple[float, list[int]]] = {}
    for name, choices in CHOICES.items():
        module = TILE_MODULES[name]
        default = module.TILES["cuda"]
        for choice in choices:
            module.TILES["cuda"] = Tiles(*choice)
            check_kernels(weights, amax, only=name)  # bitwise, this kernel with this choice
            seconds = median_seconds(calls[name], "cuda", reps=10)
            gbps = bytes_moved(name, weights) / seconds / 1e9
            mark = " (default)" if Tiles(*choice) == default else ""
            rows.append((name, f"{choice}{mark}", gbps, seconds))
            console.print(f"  {name} {choice}{mark}: {gbps:.0f} GB/s")  # survives a timeout
            if gbps > best.get(name, (0.0, []))[0]:
                best[name] = (gbps, list(choice))
        module.TILES["cuda"] = default
    chosen = {name: choice for name, (_, choice) in best.items()}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tiles.json").write_text(json.dumps(chosen))
    table = Table(title="tile sweep (every choice checked bitwise against the references first)")
    for column in ("kernel", "rows x cols x warps", "GB/s", "median ms"):
        table.add_column(column, justify="right")
    for name, choice, gbps, seconds in rows:
        table.add_row(name, choice, f"{gbps:.0f}", f"{seconds * 1e3:.3f}")
    console.print(table)
    console.print(f"fastest: {chosen}")


if __name__ == "__main__":
    main()

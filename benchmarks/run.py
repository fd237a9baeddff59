"""Calibration and quantization throughput over real MoE expert stacks, side by side in one run.

    python -m benchmarks.run [--quick] [--models Qwen3-30B-A3B,DeepSeek-V3] [--layers N] [--experts E]
                             [--device cuda|cpu] [--out DIR] [--no-modelopt]

For each model's expert shapes (separate per-expert views of stacked tensors, as a rank holds them):
- every result is first checked bitwise against the plain-torch references (and, for mtq.quantize,
  the triton_grouped amaxes against ModelOpt's own `max`); a mismatch stops the run;
- rows: grouped_amax, quantize_nvfp4 and quantize_fp8 (amax given), and `mtq.quantize` weight
  calibration with `triton_grouped`;
- columns: bytes moved (counted from the formats), median time, GB/s, % of the device bandwidth (a large
  device copy measured in the same run, read + write bytes), x speed of light (torch.amax over one
  contiguous tensor of the same bytes), x a plain per-expert torch loop, x ModelOpt (its per-expert
  export functions; `mtq.quantize` with the `max` calibrator for calibration), launches per call.
A sweep over the number of experts gives GB/s against experts (JSON, and a PNG when matplotlib is there).

GPU: triton.testing.do_bench medians after warm-up; each expert stack is far larger than L2, never zeros.
CPU: small sizes; amax and NVFP4 run the compiled C loop (kernels/native.py), FP8 the torch references;
the figures are CPU figures, not GPU claims.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from moeq_triton.kernels import amax as amax_module
from moeq_triton.kernels import fp8 as fp8_module
from moeq_triton.kernels import (
    fp8_layout,
    grouped_amax,
    grouped_amax_reference,
    grouping,
    launch_counts,
    native,
    nvfp4_layout,
    quantize_fp8,
    quantize_fp8_reference,
    quantize_nvfp4,
    quantize_nvfp4_reference,
    reset_launch_counts,
    use_triton,
)
from moeq_triton.kernels import nvfp4 as nvfp4_module
from moeq_triton.kernels.grouping import Tiles
from moeq_triton.testing import MODEL_SHAPES, MoEShape, assert_bitwise_equal, assert_results_equal

TILE_MODULES = {"grouped_amax": amax_module, "quantize_nvfp4": nvfp4_module, "quantize_fp8": fp8_module}


def apply_tiles(tiles: dict[str, list[int]]) -> None:
    """Use other GPU tile choices (rows, cols, warps) per kernel, e.g. tiles.json from tile_sweep.py."""
    for name, choice in tiles.items():
        TILE_MODULES[name].TILES["cuda"] = Tiles(*choice)


# ---------------------------------------------------------------- byte accounting (tests check these)


def bytes_moved(row: str, weights: list[torch.Tensor]) -> int:
    """Fewest bytes a row must move: each weight read once, each output (the format's layout) written once."""
    read = sum(w.numel() * w.element_size() for w in weights)
    layouts = {"quantize_nvfp4": nvfp4_layout, "quantize_fp8": lambda shape: fp8_layout(shape, False)}
    if row not in layouts:
        return read  # amax / calibration: a read pass (the amaxes themselves are negligible)
    written = sum(torch.Size(s).numel() * d.itemsize for w in weights for s, d in layouts[row](w.shape))
    return read + written


# ---------------------------------------------------------------- workload


def expert_views(shape: MoEShape, layers: int, experts: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Per-expert views of stacked (E, N, K) bf16 parameters: fc1 and fc2 of each layer."""
    gen = torch.Generator(device=device).manual_seed(seed)
    views = []
    for _ in range(layers):
        for n, k in (shape.fc1, shape.fc2):
            stacked = torch.randn(experts, n, k, generator=gen, device=device, dtype=torch.bfloat16)
            views.extend(stacked.unbind(0))
    return views


class ExpertModel(torch.nn.Module):
    """`layers.L.mlp.experts.E.{gate_up_proj,down_proj}` Linears whose weights are the given views."""

    def __init__(self, views: list[torch.Tensor], experts: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for start in range(0, len(views), 2 * experts):  # views are [fc1 x E, fc2 x E] per layer
            fc1, fc2 = views[start : start + experts], views[start + experts : start + 2 * experts]
            mlp = torch.nn.Module()
            mlp.experts = torch.nn.ModuleList(
                _expert(torch.nn.Parameter(a, requires_grad=False), torch.nn.Parameter(b, requires_grad=False))
                for a, b in zip(fc1, fc2)
            )
            layer = torch.nn.Module()
            layer.mlp = mlp
            self.layers.append(layer)


def _expert(fc1: torch.nn.Parameter, fc2: torch.nn.Parameter) -> torch.nn.Module:
    expert = torch.nn.Module()
    for name, weight in (("gate_up_proj", fc1), ("down_proj", fc2)):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = weight
        setattr(expert, name, linear)
    return expert


# ---------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, reps: int) -> float:
    """GPU: do_bench median (events, warm-up, L2 flushed between calls). CPU: median wall time."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wall_median(fn: Callable[[], object], device: str, reps: int) -> float:
    """For calls that cannot repeat on the same object (mtq.quantize converts the model in place)."""
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes read + written per second by a large device copy (the ceiling a memory-bound kernel sees)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, reps=5)
    return 2 * nbytes / seconds


# ---------------------------------------------------------------- rows


@dataclass
class Row:
    model: str
    row: str
    tensors: int
    bytes: int
    seconds: float
    speed_of_light_s: float
    loop_s: float | None = None
    modelopt_s: float | None = None
    launches: int | None = None
    collectives: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9


def check_kernels(weights: list[torch.Tensor], amax: torch.Tensor, only: str | None = None) -> None:
    """Bitwise: kernels against the plain-torch references on the same inputs (raises on a mismatch)."""
    if only in (None, "grouped_amax"):
        assert_bitwise_equal(grouped_amax(weights), grouped_amax_reference(weights).to(amax.device), "grouped_amax")
    if only in (None, "quantize_nvfp4"):
        for i, (w, r) in enumerate(zip(weights, quantize_nvfp4(weights, amax))):
            assert_results_equal(r, quantize_nvfp4_reference(w, amax[i]), f"quantize_nvfp4 weights[{i}]")
    if only in (None, "quantize_fp8"):
        for i, (w, r) in enumerate(zip(weights, quantize_fp8(weights, amax))):
            assert_results_equal(r, quantize_fp8_reference(w, amax[i]), f"quantize_fp8 weights[{i}]")


def counted_launches(fn: Callable[[], object]) -> int:
    reset_launch_counts()
    fn()
    return sum(launch_counts().values())


def modelopt_functions():
    """ModelOpt's per-expert export calls (moeq_triton.modelopt.oracle), or None when ModelOpt is not installed."""
    import importlib.util

    if importlib.util.find_spec("modelopt") is None:
        return None
    from moeq_triton.modelopt import oracle

    return oracle


def kernel_rows(shape: MoEShape, weights: list[torch.Tensor], device: str, reps: int, oracle) -> list[Row]:
    amax = grouped_amax(weights)
    check_kernels(weights, amax)
    nbytes = bytes_moved("grouped_amax", weights)
    flat = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    sol = median_seconds(lambda: torch.amax(flat), device, reps)
    cases = [
        (
            "grouped_amax",
            lambda: grouped_amax(weights),
            lambda: [w.abs().amax() for w in weights],
            None,
        ),
        (
            "quantize_nvfp4",
            lambda: quantize_nvfp4(weights, amax),
            lambda: [quantize_nvfp4_reference(w, amax[i]) for i, w in enumerate(weights)],
            oracle and (lambda: [oracle.nvfp4_export(w, amax[i]) for i, w in enumerate(weights)]),
        ),
        (
            "quantize_fp8",
            lambda: quantize_fp8(weights, amax),
            lambda: [quantize_fp8_reference(w, amax[i]) for i, w in enumerate(weights)],
            oracle and (lambda: [oracle.fp8_export(w, amax[i]) for i, w in enumerate(weights)]),
        ),
    ]
    rows = []
    for name, ours, loop, modelopt in cases:
        rows.append(
            Row(
                shape.name,
                name,
                len(weights),
                bytes_moved(name, weights),
                median_seconds(ours, device, reps),
                sol,
                loop_s=median_seconds(loop, device, reps),
                modelopt_s=median_seconds(modelopt, device, reps) if modelopt else None,
                launches=counted_launches(ours) if use_triton(torch.device(device)) else 0,
            )
        )
    return rows


class CollectiveCounter:
    """Counts torch.distributed collectives issued inside the block (all_reduce, all_gather, ...)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce", "all_gather_into_tensor")

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed as dist

        self.count, self._saved = 0, {}
        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)


def calibration_row(
    shape: MoEShape, weights: list[torch.Tensor], experts: int, device: str, reps: int, sol: float
) -> Row:
    """Weight calibration through ModelOpt: `triton_grouped` vs ModelOpt's `max`, same weights.

    Each model is converted once by `mtq.quantize` (module wrappers around the shared weights, no copies;
    every amax checked bitwise against max), then `mtq.calibrate(forward_loop=None)` is timed: the
    weight-only calibration pass alone, without the one-time module conversion.
    """
    import modelopt.torch.quantization as mtq

    import moeq_triton

    def convert(cfg) -> torch.nn.Module:
        return mtq.quantize(ExpertModel(weights, experts), cfg, forward_loop=None)

    def amaxes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: m.amax for n, m in model.named_modules() if n.endswith("weight_quantizer") and m.amax is not None}

    def calibrate(model: torch.nn.Module) -> None:
        mtq.calibrate(model, algorithm="max", forward_loop=None)

    reference = convert(copy.deepcopy(mtq.W4A16_NVFP4_CFG))
    ours = convert(moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    for model in (reference, ours):
        calibrate(model)
    expected, got = amaxes(reference), amaxes(ours)
    assert expected.keys() == got.keys() and len(got) == len(weights), "quantizer sets differ"
    for name in expected:
        assert_bitwise_equal(got[name], expected[name], f"calibrated amax of {name}")
    with CollectiveCounter() as ours_collectives:
        launches = counted_launches(lambda: calibrate(ours))
    with CollectiveCounter() as max_collectives:
        calibrate(reference)
    return Row(
        shape.name,
        "mtq.calibrate weights (triton_grouped)",
        len(weights),
        bytes_moved("calibration", weights),
        wall_median(lambda: calibrate(ours), device, reps),
        sol,
        modelopt_s=wall_median(lambda: calibrate(reference), device, reps),
        launches=launches,
        collectives=ours_collectives.count,
        extra={"modelopt_collectives": max_collectives.count},
    )


def sweep(shape: MoEShape, weights: list[torch.Tensor], experts: int, device: str, reps: int) -> list[dict]:
    """GB/s of grouped_amax and quantize_nvfp4 against the number of experts (first layer's views)."""
    points = []
    counts = sorted({e for e in (1, 2, 4, 8, 16, 32, 64, 128, 256) if e <= experts} | {experts})
    fc1, fc2 = weights[:experts], weights[experts : 2 * experts]
    for e in counts:
        subset = fc1[:e] + fc2[:e]
        amax = grouped_amax(subset)
        for name, fn in (
            ("grouped_amax", lambda subset=subset: grouped_amax(subset)),
            ("quantize_nvfp4", lambda subset=subset, amax=amax: quantize_nvfp4(subset, amax)),
        ):
            seconds = median_seconds(fn, device, reps)
            points.append(
                {"model": shape.name, "row": name, "experts": e, "gbps": bytes_moved(name, subset) / seconds / 1e9}
            )
    return points


# ---------------------------------------------------------------- output


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "nvidia-modelopt"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def render(rows: list[Row], title: str, bandwidth: float) -> Table:
    table = Table(title=title)
    columns = ("model", "row", "GB moved", "median ms", "GB/s", "% copy BW", "x SoL", "x loop", "x ModelOpt")
    for column in (*columns, "launches", "collectives"):
        table.add_column(column, justify="right")

    def ratio(other: float | None, ours: float) -> str:
        return f"{other / ours:.1f}" if other else "-"

    for r in rows:
        table.add_row(
            r.model,
            r.row,
            f"{r.bytes / 1e9:.3f}",
            f"{r.seconds * 1e3:.3f}",
            f"{r.gbps:.1f}",
            f"{100 * r.bytes / r.seconds / bandwidth:.0f}%",
            f"{r.speed_of_light_s / r.seconds:.2f}",
            ratio(r.loop_s, r.seconds),
            ratio(r.modelopt_s, r.seconds),
            "-" if r.launches is None else str(r.launches),
            "-" if r.collectives is None else f"{r.collectives} (ModelOpt {r.extra['modelopt_collectives']})",
        )
    return table


def plot(points: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(p["model"], p["row"]) for p in points}):
        xs = [p["experts"] for p in points if (p["model"], p["row"]) == key]
        ys = [p["gbps"] for p in points if (p["model"], p["row"]) == key]
        ax.plot(xs, ys, marker="o", label=" ".join(key))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts (fc1 + fc2 each) in one call")
    ax.set_ylabel("GB/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing, so only host work is timed."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_overhead(device: str, counts: tuple[int, ...] = (1, 16, 1024), reps: int = 20) -> list[dict]:
    """Host microseconds of one grouped launch (NVFP4's: three outputs per weight), the kernel itself
    stubbed out: the first call builds the device table, later calls find it in the cache and only
    write the per-call output pointers.  Allocating the outputs (as quantize_nvfp4 does) is timed apart."""
    out = []
    tiles = nvfp4_module.TILES["cuda"]
    for n in counts:
        weights = list(torch.zeros(n, 8, 64, dtype=torch.bfloat16, device=device).unbind(0))

        def allocate(weights=weights) -> list[list[torch.Tensor]]:
            results = [[torch.empty(s, dtype=d, device=device) for s, d in nvfp4_layout(w.shape)] for w in weights]
            return [list(col) for col in zip(*results)]

        def call(outputs, weights=weights) -> None:
            grouping.launch("host", _NoLaunch(), weights, tiles, outputs=outputs, BLOCKS=tiles.cols)

        outputs = allocate()
        grouping.clear_table_cache()
        start = time.perf_counter()
        call(outputs)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(reps):
            call(outputs)
        warm = (time.perf_counter() - start) / reps
        start = time.perf_counter()
        for _ in range(reps):
            allocate()
        alloc = (time.perf_counter() - start) / reps
        out.append(
            {
                "tensors": n,
                "first_call_us": cold * 1e6,
                "cached_call_us": warm * 1e6,
                "allocate_outputs_us": alloc * 1e6,
            }
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one model (CI on CPU)")
    parser.add_argument("--models", default=None, help="comma-separated; default: all (quick: the first)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=None, help="default: the model's own (CPU: 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write results.json (and sweep.png) here")
    parser.add_argument("--no-modelopt", action="store_true", help="skip the ModelOpt columns and row")
    parser.add_argument("--tiles", type=Path, default=None, help="GPU tile choices (tiles.json of tile_sweep.py)")
    args = parser.parse_args(argv)
    if args.tiles:
        apply_tiles(json.loads(args.tiles.read_text()))

    names = args.models.split(",") if args.models else [m.name for m in MODEL_SHAPES[: 1 if args.quick else None]]
    shapes = [next(m for m in MODEL_SHAPES if m.name == n) for n in names]
    gpu = args.device == "cuda"
    reps = 3 if args.quick else 10
    console = Console(width=200)
    bandwidth = copy_bandwidth(args.device, (2 << 30) if gpu else (64 << 20))
    console.print(f"device copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    oracle = None if args.no_modelopt else modelopt_functions()

    host = host_overhead(args.device)
    for h in host:
        console.print(
            f"host time of a grouped launch, {h['tensors']} tensors: first call {h['first_call_us']:.0f} us, "
            f"cached table {h['cached_call_us']:.0f} us (kernel stubbed); allocating the outputs "
            f"{h['allocate_outputs_us']:.0f} us"
        )
    rows: list[Row] = []
    points: list[dict] = []
    for shape in shapes:
        experts = args.experts or (shape.experts if gpu else 4)
        weights = expert_views(shape, args.layers, experts, args.device)
        console.print(f"{shape.name}: {len(weights)} tensors, {bytes_moved('amax', weights) / 1e9:.2f} GB, checking...")
        kernels = kernel_rows(shape, weights, args.device, reps, oracle)
        rows += kernels
        if oracle is not None:
            rows.append(calibration_row(shape, weights, experts, args.device, 3, kernels[0].speed_of_light_s))
        if shape is shapes[0]:
            points = sweep(shape, weights, experts, args.device, reps)
        console.print(render(rows[-4:], f"{shape.name} (partial)", bandwidth))  # survives a later timeout
        del weights
        if gpu:
            torch.cuda.empty_cache()

    if use_triton(torch.device(args.device)):
        engine = "Triton"
    elif native.enabled():
        engine = "C loop (amax, NVFP4) and torch references (FP8): CPU figures, not GPU claims"
    else:
        engine = "torch references: CPU figures, not GPU claims"
    title = (
        f"{device_name(args.device)}, kernels: {engine}; {args.layers} layer(s), bf16 experts; "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; all results checked bitwise before timing"
    )
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "device": device_name(args.device),
        "versions": versions(),
        "tiles": {name: list(module.TILES["cuda"]) for name, module in TILE_MODULES.items()},
        "copy_bandwidth_bytes_per_s": bandwidth,
        "rows": [asdict(r) | {"gbps": r.gbps} for r in rows],
        "sweep": points,
        "host_us": host,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
        drew = plot(points, args.out / "sweep.png")
        console.print(
            f"wrote {args.out / 'results.json'}" + (" and sweep.png" if drew else " (no matplotlib: no plot)")
        )
    console.print(render(rows, title, bandwidth))
    return result


if __name__ == "__main__":
    main()

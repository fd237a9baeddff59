"""The ``moeq-triton`` command line.  Expected failures print one line and exit non-zero.

Interrupts (SIGINT, SIGTERM) are expected too: the message says truthfully what is on disk.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moeq_triton.version import __version__


def byte_size(text: str) -> int:
    """'2GB', '500MB', '64MiB', '123' -> bytes (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GB, 500MB)")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """The command; returns the exit code.  SIGINT/SIGTERM anywhere in it (imports included) end it with
    130/143 and one line.  ``exiting``: the process ends right after (the console script), so once the
    outcome is decided later signals stay ignored instead of the previous handlers coming back."""
    with _Signals(keep_settled=exiting) as signals:
        try:
            return _main(argv, signals)
        except KeyboardInterrupt as interrupt:  # before any output was begun (arguments, imports, inspect)
            signals.settle()
            print(f"moeq-triton: {_what(interrupt)}; nothing was written", file=sys.stderr)
            return _exit_code(interrupt)


def run() -> None:
    """The console script ``moeq-triton`` and ``python -m moeq_triton``."""
    # start-up (torch) allocates about a million objects that live as long as the process: no collection
    # runs while they are imported, and afterwards they are frozen out of every later one (see _main)
    gc.disable()
    # before torch and numpy load their thread pools: OpenMP workers that spin after each small torch op, and
    # OpenBLAS threads numpy starts (no BLAS runs here), take 10-15% of a 2-core machine's CPU from the C loop's
    # threads (perf, MEDIUM nvfp4); a user's own setting wins
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    end_process(main(exiting=True))


def end_process(code: int) -> None:
    """Exit with ``code``, skipping Python's finalization once torch is loaded (its module teardown alone takes
    about 0.3 s, 15% of a MEDIUM run): every file is closed by then and the output is final.  Under torchrun
    (a process group joined) the ordinary exit runs, so torch.distributed shuts down as it expects."""
    dist = sys.modules.get("torch.distributed")
    if "torch" not in sys.modules or (dist is not None and dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what Python's own exit would also fail to write
            pass
    os._exit(code)


def _main(argv: list[str] | None, signals: _Signals) -> int:
    with signals.held():  # imports torch (through the kernels' constants)
        from moeq_triton.checkpoint.formats import FORMATS
        from moeq_triton.checkpoint.job import BATCH_BYTES
    if signals.keep_settled:  # the process itself (run): what is loaded now stays loaded, never worth collecting
        gc.freeze()
        gc.enable()

    parser = argparse.ArgumentParser(prog="moeq-triton", description="Grouped NVFP4/FP8 quantization of MoE models.")
    parser.add_argument("--version", action="version", version=f"moeq-triton {__version__}")
    sub = parser.add_subparsers(dest="command")
    q = sub.add_parser("quantize", help="quantize a Hugging Face checkpoint without building the model")
    q.add_argument(
        "--model",
        help="local HF directory (config.json + safetensors) or a Hub id org/name (fetched into the Hub cache: "
        "config, safetensors, tokenizer files only); default: a SYNTHETIC model",
    )
    q.add_argument("--revision", help="with a Hub id: branch, tag or commit (default: main)")
    q.add_argument("--out", help="destination directory (default: ./<model name>-<format>)")
    q.add_argument(
        "--format",
        choices=list(FORMATS),
        default="nvfp4",
        help="nvfp4 = weight-only W4A16_NVFP4; fp8-block = FP8 in 128x128 blocks, the layout the engines run for MoE",
    )
    q.add_argument("--experts-only", action="store_true", help="quantize only the routed MoE experts")
    q.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="keep modules matching this glob in high precision (repeatable), e.g. '*.self_attn.*'",
    )  # fmt: skip
    q.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    q.add_argument("--verify", action="store_true", help="reload the output and check it")
    q.add_argument("--max-shard-size", type=byte_size, default=byte_size("2GB"))
    q.add_argument(
        "--batch-size",
        type=byte_size,
        default=BATCH_BYTES,
        help=f"source bytes held in memory at once (default {BATCH_BYTES >> 20}MB)",
    )
    q.add_argument(
        "--allow-nonfinite-kept", action="store_true", help="carry kept (unquantized) tensors holding NaN/Inf through"
    )
    ins = sub.add_parser("inspect", help="check a checkpoint: format, scales, non-finite values, engine verdicts")
    ins.add_argument("path", metavar="DIR", help="checkpoint directory (ours, ModelOpt's, or a source checkpoint)")
    ins.add_argument("--device", choices=["cuda", "cpu"], default=None, help="where the non-finite pass runs")
    demo = sub.add_parser("demo", help="quantize one synthetic MoE layer in memory and print a table")
    demo.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "quantize":
        for option, value in (("--out", args.out), ("--model", args.model)):
            if value is not None and not value.strip():
                parser.error(f"{option}: an empty path (name a directory)")

    with signals.held():
        import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("moeq-triton: error: --device cuda, but torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 1
    if args.command == "demo":
        from moeq_triton.demo import run_demo

        run_demo(device)
        return 0
    if args.command == "inspect":
        from moeq_triton.checkpoint.checks import run_inspect

        return run_inspect(args.path, device)
    return _quantize(args, FORMATS[args.format], device, signals)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def _what(interrupt: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"


def _exit_code(interrupt: KeyboardInterrupt) -> int:
    return 143 if isinstance(interrupt, Terminated) else 130


class _Signals:
    """Within the block (main thread only): SIGINT raises KeyboardInterrupt and SIGTERM Terminated, until
    ``settle()``: from then on the outcome is decided (the output committed, or the error being reported)
    and a signal is only recorded in ``ignored``.  A signal the parent process ignores stays ignored.
    On leaving, the previous handlers come back, unless ``keep_settled`` (the process is about to exit)."""

    def __init__(self, keep_settled: bool = False) -> None:
        self.keep_settled = keep_settled
        self.settled = False
        self.ignored: list[int] = []
        self.previous: dict[int, object] = {}
        self.holding = False
        self.pending: list[int] = []

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(number) != signal.SIG_IGN:
                    self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        if self.settled:
            self.ignored.append(number)
            return
        if self.holding:
            self.pending.append(number)
            return
        raise Terminated if number == signal.SIGTERM else KeyboardInterrupt

    def settle(self) -> None:
        self.settled = True

    @contextmanager
    def held(self) -> Iterator[None]:
        """A signal inside the block is raised when it ends.  For the heavy imports (torch, triton): an
        exception raised while torch's C++ initialisation runs Python code ends the process in
        std::terminate (SIGABRT, exit 134) instead of unwinding."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            if self.pending and not self.settled:
                number = self.pending[0]
                self.pending.clear()
                raise Terminated if number == signal.SIGTERM else KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.keep_settled:  # ignored, not just settled: Python's finalization resets Python-level handlers to
            self.settle()  # the default (death by the signal) but leaves an ignored signal ignored
            for number in self.previous:
                signal.signal(number, signal.SIG_IGN)
            return
        for number, previous in self.previous.items():  # None: a handler set outside Python
            signal.signal(number, signal.SIG_DFL if previous is None else previous)


def fast_path_note(device: str) -> str | None:
    """A note when the CPU run lacks the compiled C loop (the torch references are much slower)."""
    import torch

    from moeq_triton import kernels

    if device != "cpu" or kernels.use_triton(torch.device("cpu")):
        return None
    slower = "quantization runs the torch references instead, slower (a whole run 1.5x to 6.3x measured)"
    if os.environ.get("MOEQ_TRITON_NATIVE", "1") == "0":
        return f"note: MOEQ_TRITON_NATIVE=0 turns the fast CPU path off: {slower}"
    if kernels.native.library() is None:
        return (
            f"note: the fast CPU path (kernels/nvfp4_cpu.c) could not be compiled, no working C compiler "
            f"(cc, gcc or $CC): {slower}; install one (e.g. apt install gcc) to enable it"
        )
    return None


def memory_line(peak) -> str:
    """The memory figure: the heap peak (what --max-shard-size and --batch-size bound) apart from file-backed
    pages (on CPU the source tensors are read zero-copy from the mapped shards)."""
    if not peak.samples:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        return f"peak memory (RSS, includes mapped source files): {rss:.0f} MiB"
    return (
        f"peak memory: {peak.anonymous / 2**20:.0f} MiB heap (anonymous: the batches in flight, each bounded by "
        "--batch-size: one read ahead, one in work, the previous one's output being written); "
        f"file-backed pages (mapped source shards, libraries) up to {peak.file_backed / 2**20:.0f} MiB, "
        "which the kernel can drop"
    )


def _quantize(args, fmt, device: str, signals: _Signals) -> int:
    rank = int(os.environ.get("RANK", "0"))
    out = args.out or "the destination"
    phase = "running"  # "committed" once the output is in place, then "verifying"

    def committed() -> None:
        nonlocal phase
        phase = "committed"
        if not args.verify:
            signals.settle()  # the output is complete: a signal from now on ends nothing

    try:
        with signals.held():  # safetensors, rich (triton only on a first Triton launch, in the run)
            from rich.console import Console

            from moeq_triton.checkpoint import hub
            from moeq_triton.checkpoint.io import CheckpointError
            from moeq_triton.checkpoint.quantize import quantize_checkpoint, verify
            from moeq_triton.distributed import PeerFailure
            from moeq_triton.memory import MemorySampler
            from moeq_triton.naming import UnsupportedArchitecture

        if args.revision and not (args.model and hub.is_hub_id(args.model)):
            signals.settle()
            print("moeq-triton: error: --revision needs --model to be a Hub id (org/name)", file=sys.stderr)
            return 2
        console = Console(stderr=False, quiet=rank != 0)
        try:
            if args.model and hub.is_hub_id(args.model):
                source = hub.download(args.model, args.revision)
                name = args.model.rpartition("/")[2]
            elif args.model:
                source = name = args.model
            else:
                from moeq_triton.synthetic import default_checkpoint

                source = name = str(default_checkpoint())
                console.print(f"No --model given: using the embedded SYNTHETIC Qwen3-MoE checkpoint at {source}")
            out = args.out or f"{os.path.basename(os.path.normpath(name))}-{fmt.name}"
            note = fast_path_note(device)
            if note and rank == 0:
                print(f"moeq-triton: {note}", file=sys.stderr)
            with MemorySampler() as peak, _progress(console) as progress:
                plan, stats, seconds = quantize_checkpoint(
                    source,
                    out,
                    fmt,
                    experts_only=args.experts_only,
                    device=device,
                    overwrite=args.overwrite,
                    max_shard_bytes=args.max_shard_size,
                    batch_bytes=args.batch_size,
                    progress=progress,
                    exclude=tuple(args.exclude),
                    allow_nonfinite_kept=args.allow_nonfinite_kept,
                    on_commit=committed,
                )
            console.print(_table(plan, stats, seconds, out, device))
            for name in stats.nonfinite_kept:
                print(
                    f"moeq-triton: warning: kept tensor {name} contains NaN or Inf (carried through)", file=sys.stderr
                )
            for warning in stats.warnings if rank == 0 else ():
                print(f"moeq-triton: warning: {warning}", file=sys.stderr)
            from moeq_triton.checkpoint.serving import end_of_run_warning

            warning = end_of_run_warning(fmt.quant_algo, source_config(source))
            if warning and rank == 0:
                print(warning, file=sys.stderr)
            if args.verify and rank == 0:
                from moeq_triton.checkpoint.io import SourceCheckpoint

                phase = "verifying"
                problems, warnings = verify(
                    out, SourceCheckpoint(source), plan, torch_device(device), allowed_nonfinite=stats.nonfinite_kept
                )
                signals.settle()
                for warning in warnings:
                    print(f"moeq-triton: verify: warning: {warning}", file=sys.stderr)
                if problems:
                    print(f"moeq-triton: verify failed for {out}: {problems[0]}", file=sys.stderr)
                    return 1
                console.print(
                    f"verify: {out} reloads; every tensor present with its shape and dtype; "
                    "re-quantization bitwise equal"
                )
            signals.settle()
            console.print(memory_line(peak))
            if signals.ignored and rank == 0:
                what = "SIGTERM" if signal.SIGTERM in signals.ignored else "SIGINT"
                print(f"moeq-triton: {what} received after {out} had been written completely; "
                      "it is complete, exiting normally", file=sys.stderr)  # fmt: skip
            return 0
        except (CheckpointError, UnsupportedArchitecture, PeerFailure) as error:
            signals.settle()
            print(f"moeq-triton: error: {error}", file=sys.stderr)
            return 1
    except KeyboardInterrupt as interrupt:
        signals.settle()
        what = _what(interrupt)
        if phase == "verifying":
            said = f"{what} during --verify; {out} had been written completely, but it is not verified"
        elif phase == "committed":
            said = f"{what}; {out} had already been written completely"
        else:
            said = f"{what} before the output was complete; {out} is as it was before the run (nothing left behind)"
        print(f"moeq-triton: {said}", file=sys.stderr)
        return _exit_code(interrupt)


def source_config(source: str) -> dict:
    """The source's config.json (the warning needs to know whether the model is a MoE)."""
    import json

    return json.loads((Path(source) / "config.json").read_text())


def torch_device(name: str):
    import torch

    return torch.device(name)


class _progress:
    """A rich progress bar over source bytes; yields the factory quantize_checkpoint expects.

    Only on a terminal: elsewhere (a pipe, a log file) the transient bar shows nothing, and rich.progress,
    its refresh thread and its closing blank line cost a few ms of every scripted run."""

    def __init__(self, console) -> None:
        self.bar = None
        if not console.is_terminal:
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        self.bar = Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=console, transient=True,
        )  # fmt: skip

    def __enter__(self):
        if self.bar is None:
            return lambda rank, total: lambda n: None
        self.bar.__enter__()

        def factory(rank: int, total: int):
            task = self.bar.add_task(f"quantizing (rank {rank})", total=total)
            return lambda n: self.bar.advance(task, n)

        return factory

    def __exit__(self, *exc):
        return None if self.bar is None else self.bar.__exit__(*exc)


def _table(plan, stats, seconds: float, out: str, device: str):
    from rich.table import Table

    table = Table(title=f"{out}: {plan.fmt.quant_algo} on {device}, {len(plan.shards)} shard(s)")
    for column in (
        "quantized",
        "all-zero",
        "kept",
        "GB in",
        "GB out",
        "seconds",
        "GB/s",
        "max rel. err",
        "mean rel. err",
    ):
        table.add_column(column, justify="right")
    errors = stats.errors or [(float("nan"), float("nan"))]
    table.add_row(
        str(stats.quantized), str(stats.all_zero), str(stats.kept), f"{stats.bytes_in / 1e9:.3f}",
        f"{stats.bytes_out / 1e9:.3f}", f"{seconds:.2f}", f"{stats.bytes_in / 1e9 / seconds:.2f}",
        f"{max(e[0] for e in errors):.2e}",
        f"{sum(e[1] for e in errors) / len(errors):.2e}",
    )  # fmt: skip
    excluded = ", ".join(plan.exclude_modules[:4]) + (" ..." if len(plan.exclude_modules) > 4 else "")
    table.caption = (
        "all-zero: quantized tensors whose every value is zero (they dequantize to exact zeros; for NVFP4 ModelOpt "
        "writes NaN scales there). GB/s counts this rank's source bytes over the whole job. Error: "
        "|dequantized - w| / max|w| of one "
        f"sampled tensor per batch. Kept unquantized (exclude_modules): {excluded}"
    )
    return table


if __name__ == "__main__":
    run()

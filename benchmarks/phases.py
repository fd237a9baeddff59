"""Where one `moeq-triton quantize` run's time goes, phase by phase, in one fresh process (issue 25's profile).

    python -m benchmarks.phases SRC [--format nvfp4] [--out DIR]

Times the imports (torch; then rich and the package: triton only where a Triton launch runs), then runs the
command in process (``cli.main``) with each step wrapped: planning, reading a batch (reader thread), the C loop's
calls, the sampled error, the NaN/Inf check of kept tensors, the shard writes (writer thread) and the caller's
waits for them, the commit.
Threads overlap, so the rows do not add up to the wall time; the wall and CPU seconds of the whole run are
printed beside them.  Python's start-up and the process exit are outside (end_to_end.py times whole processes).
The environment the console script sets (OpenMP / OpenBLAS threads passive) is set here first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--format", default="nvfp4")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "moeq-phases"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("TRITON_INTERPRET", "0")

    start = time.perf_counter()
    import torch  # noqa: F401

    after_torch = time.perf_counter()
    import rich.console  # noqa: F401

    from moeq_triton import cli
    from moeq_triton.checkpoint import io as checkpoint_io
    from moeq_triton.checkpoint import job, quantize, shard_file
    from moeq_triton.kernels import native

    native.library()
    after_imports = time.perf_counter()
    print(f"triton imported: {'triton' in sys.modules}")

    seconds: dict[str, float] = defaultdict(float)
    calls: Counter = Counter()
    lock = threading.Lock()

    def wrap(holder, name: str, label: str) -> None:
        original = getattr(holder, name)

        def timed(*a, **k):
            began = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                with lock:
                    seconds[label] += time.perf_counter() - began
                    calls[label] += 1

        setattr(holder, name, timed)

    wrap(quantize, "make_plan", "plan")
    wrap(quantize, "read_units", "read a batch (reader thread; zero-copy get_tensor)")
    wrap(native, "amax", "C loop: amax (first touch of the mapped source)")
    for name in ("nvfp4", "fp8", "fp8_block"):
        wrap(native, name, f"C loop: {name}")
    wrap(job, "quantize_units", "quantize_units (C loop + outputs + all-zero)")
    wrap(job, "dequantize", "sampled error: dequantize")
    wrap(job, "relative_error", "sampled error: compare")
    wrap(job, "nonfinite_kept", "NaN/Inf check of kept tensors")
    wrap(shard_file.ShardFile, "_start", "shard header (writer thread)")
    wrap(shard_file.ShardFile, "_write_all", "shard writes (writer thread)")
    wrap(shard_file.ShardFile, "write", "caller waits to hand over a batch")
    wrap(shard_file.ShardFile, "__exit__", "caller waits for the last write")
    wrap(job, "write_metadata", "metadata files")
    wrap(checkpoint_io.AtomicCheckpointDir, "commit", "commit (renames; removes an --overwrite'n output)")
    argv = ["quantize", "--model", args.source, "--out", args.out, "--overwrite", "--device", "cpu"]
    cpu, began = cpu_seconds(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main([*argv, "--format", args.format])
    wall = time.perf_counter() - began
    if code:
        raise SystemExit(f"the command failed (exit {code})")
    print(f"{args.format} from {args.source}")
    print("| phase | s | calls |")
    print("|---|---|---|")
    print(f"| import torch | {after_torch - start:.3f} | 1 |")
    print(f"| import rich, the package (and triton, if anything imported it); load the C library | "
          f"{after_imports - after_torch:.3f} | 1 |")  # fmt: skip
    print(f"| the command (cli.main), wall | {wall:.3f} | 1 |")
    print(f"| the command, CPU (all threads) | {cpu_seconds() - cpu:.3f} | 1 |")
    for label, value in seconds.items():
        print(f"| {label} | {value:.3f} | {calls[label]} |")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()

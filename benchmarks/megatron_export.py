"""Export time and memory per rank of one Qwen3-MoE GPTModel at TP=1, TP=2 and PP=2 (gloo processes on CPU).

    python -m benchmarks.megatron_export [--scale 32]

Per rank: the bytes of its own parameter slices, the export's wall time, and the export's heap peak (anonymous
resident memory, ``moeq_triton.memory``) above what the process held just before it (after glibc's
``malloc_trim``, so that memory freed while building the model is not silently reused by the export).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import time
from pathlib import Path

from tests.distributed_harness import run_ranks, values

PARALLELISMS = {"TP=1": (1, 1), "TP=2": (2, 1), "PP=2": (1, 2)}


def _export(rank: int, world: int, out: str, tp: int, pp: int, scale: int) -> dict:
    import gc

    from megatron.core import parallel_state

    import moeq_triton
    from moeq_triton.memory import MemorySampler, resident
    from tests.megatron_models import gpt_model, hf_config

    os.environ["TRITON_INTERPRET"] = "0"
    parallel_state.initialize_model_parallel(tp, pp)
    try:
        model = gpt_model("moe", scale=scale)
        own = sum(p.numel() * p.element_size() for p in model.parameters())
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed while building goes back: not counted as free room
        before = resident()[0]
        start = time.perf_counter()
        with MemorySampler(0.002) as peak:
            moeq_triton.export_hf(model, out, hf_config("moe", scale), fmt="nvfp4", max_shard_bytes=64 << 20)
        seconds = time.perf_counter() - start
        peak = peak.anonymous - before
    finally:
        parallel_state.destroy_model_parallel()
    return {"own_mib": own / 2**20, "seconds": seconds, "peak_above_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=32, help="width multiplier of tests/megatron_models.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (tp, pp) in PARALLELISMS.items():
            out = os.path.join(tmp, name.replace("=", ""))
            results = values(run_ranks(_export, tp * pp, out, tp, pp, args.scale, timeout_s=600))
            total = sum(f.stat().st_size for f in Path(out).iterdir()) / 2**20
            for rank, r in enumerate(results):
                print(f"| {name} | {rank} | {r['own_mib']:.1f} | {r['seconds']:.2f} | {r['peak_above_mib']:.1f} "
                      f"| {total:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""Whole-checkpoint timing: `moeq-triton quantize` per format and per source dtype, beside merely reading every
tensor and beside ModelOpt's route for the same format.

    python -m benchmarks.end_to_end [--repeats 3] [--modelopt] [--device cpu] [--formats nvfp4 fp8 ...]

Generates a MEDIUM synthetic Qwen3-MoE once, the size of the team's peer comparison (hidden 1024, moe_intermediate
384, 64 experts, 4 layers, 8 heads / 4 KV heads, head_dim 128, vocab 4096, heavy-tailed bf16, two shards)
and its FP8-block twin (DeepSeek's released layout: `moeq-triton quantize --format fp8-block` of it, which
is ModelOpt's FP8_PB_WO numbers), then runs every route once per round, rounds alternating, each in a fresh
process so imports count as a user sees them:
- read: safe_open + get_tensor + clone of every tensor of a source (whole process; in-process time too);
- ours: `python -m moeq_triton quantize --format F` from each source (whole process);
- ModelOpt (with --modelopt; bf16 source only: it has no CPU reader of FP8-block checkpoints):
  from_pretrained + mtq.quantize(its config for F, inputs disabled) + export_hf_checkpoint.
Prints the median wall seconds of each route, the ratios (issue 25's table), the median CPU seconds (user +
system of the process: on a shared machine steadier than wall time) and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEDIUM = dict(
    hidden_size=1024, intermediate_size=2048, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=4096,
)  # fmt: skip

FORMATS = ("nvfp4", "fp8", "fp8-per-channel", "fp8-block")

READ = """
import sys, time
t0 = time.perf_counter()
from pathlib import Path
from safetensors import safe_open
n = 0
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(f), "pt") as h:
        for k in h.keys():
            n += h.get_tensor(k).clone().numel()
print(f"READ {time.perf_counter() - t0:.4f}")
"""

MODELOPT = """
import sys, copy, torch, warnings
warnings.filterwarnings("ignore")
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM
config = {
    "nvfp4": mtq.W4A16_NVFP4_CFG,
    "fp8": mtq.FP8_DEFAULT_CFG,
    "fp8-per-channel": mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG,
    "fp8-block": mtq.FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG,
}[sys.argv[3]]
config = copy.deepcopy(config)
config["quant_cfg"].append({"quantizer_name": "*input_quantizer", "enable": False})
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.config.architectures = ["Qwen3MoeForCausalLM"]
mtq.quantize(model, config)
export_hf_checkpoint(model, export_dir=sys.argv[2])
"""


def medium_checkpoint(root: Path) -> Path:
    path = root / "medium-qwen3-moe"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from moeq_triton.synthetic import heavy_tailed

    config = Qwen3MoeConfig(**MEDIUM)
    config.architectures = ["Qwen3MoeForCausalLM"]
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(heavy_tailed(p.shape, gen, p.dtype, scale=0.02))
    model.save_pretrained(path, max_shard_size="400MB")
    return path


def fp8_block_twin(source: Path, env: dict) -> Path:
    """The same model in the FP8-block layout DeepSeek-V3 ships (codes + float32 weight_scale_inv)."""
    path = source.with_name(source.name + "-fp8-block")
    if not (path / "config.json").is_file():
        cmd = [sys.executable, "-m", "moeq_triton", "quantize", "--model", str(source), "--out", str(path),
               "--format", "fp8-block", "--device", "cpu", "--max-shard-size", "400MB"]  # fmt: skip
        timed(cmd, env)
    return path


def cpu_seconds() -> float:
    """user + system CPU time of all finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict) -> tuple[float, str, float]:
    """(wall seconds, stdout, CPU seconds) of one fresh process."""
    cpu, start = cpu_seconds(), time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{run.stderr[-2000:]}")
    return time.perf_counter() - start, run.stdout, cpu_seconds() - cpu


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modelopt", action="store_true", help="also time ModelOpt's load+quantize+export")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--cache", default=os.environ.get("MOEQ_TRITON_CACHE", Path.home() / ".cache" / "moeq-triton"))
    args = parser.parse_args()

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    sources = {"bf16": medium_checkpoint(Path(args.cache))}
    sources["FP8-block"] = fp8_block_twin(sources["bf16"], env)
    work = Path(tempfile.mkdtemp())
    routes: dict[str, list[str]] = {}
    for dtype, path in sources.items():
        routes[f"read {dtype}"] = [sys.executable, "-c", READ, str(path)]
        for fmt in args.formats:
            routes[f"ours {fmt} from {dtype}"] = [
                sys.executable, "-m", "moeq_triton", "quantize", "--model", str(path), "--out", str(work / "ours"),
                "--overwrite", "--device", args.device, "--format", fmt,
            ]  # fmt: skip
    if args.modelopt:
        for fmt in args.formats:
            routes[f"ModelOpt {fmt} from bf16"] = [sys.executable, "-c", MODELOPT, str(sources["bf16"]),
                                                   str(work / "modelopt"), fmt]  # fmt: skip
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {name: [] for name in routes}
    cpu: dict[str, list[float]] = {name: [] for name in routes}
    in_process: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # rounds alternate the routes, so a load change hits all of them alike
        for name, cmd in routes.items():
            shutil.rmtree(work / "modelopt", ignore_errors=True)
            took, out, used = timed(cmd, env)
            seconds[name].append(took)
            cpu[name].append(used)
            print(f"round {len(seconds[name])}: {name}: {took:.2f} s wall, {used:.2f} s CPU", flush=True)
            if name.startswith("read"):
                in_process.setdefault(name, []).append(float(out.split()[-1]))
    shutil.rmtree(work, ignore_errors=True)

    median = {name: statistics.median(s) for name, s in seconds.items()}
    sizes = ", ".join(f"{dtype} {size_mb(p):.0f} MB" for dtype, p in sources.items())
    print(f"MEDIUM synthetic Qwen3-MoE ({sizes}); median of {args.repeats} alternating rounds; whole process")
    print("| route | median s (all runs) | / read of its source | / ours nvfp4 from bf16 | ModelOpt / ours | CPU s |")
    print("|---|---|---|---|---|---|")
    base = median.get("ours nvfp4 from bf16")
    for name, m in median.items():
        runs = ", ".join(f"{s:.2f}" for s in seconds[name])
        dtype = name.rsplit(" ", 1)[-1] if name.startswith(("ours", "ModelOpt")) else name.split(" ", 1)[1]
        read = median[f"read {dtype}"]
        to_read = f"{m / read:.2f}" if name.startswith("ours") else "-"
        to_base = f"{m / base:.2f}" if base and not name.startswith("ModelOpt") else "-"
        theirs = median.get(name.replace("ours", "ModelOpt", 1)) if name.startswith("ours") else None
        vs = f"{theirs / m:.2f}" if theirs else "-"
        print(f"| {name} | {m:.2f} ({runs}) | {to_read} | {to_base} | {vs} | {statistics.median(cpu[name]):.2f} |")
    print(f"load average (1, 5, 15 min) before {load_before}, after {os.getloadavg()}")
    for name, s in in_process.items():
        print(f"{name}, in process after imports: median {statistics.median(s):.2f} s")


if __name__ == "__main__":
    main()

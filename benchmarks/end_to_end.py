"""Whole-checkpoint timing: `moeq-triton quantize` vs merely reading every tensor vs ModelOpt's route.

    python -m benchmarks.end_to_end [--repeats 3] [--modelopt] [--device cpu]

Generates a MEDIUM synthetic Qwen3-MoE once, the size of the team's peer comparison (hidden 1024, moe_intermediate
384, 64 experts, 4 layers, 8 heads / 4 KV heads, head_dim 128, vocab 4096, heavy-tailed bf16, two shards),
then runs, alternately and in fresh processes so imports count as a user sees them:
- read floor: safe_open + get_tensor + clone of every tensor (in-process time, after imports);
- ours: `python -m moeq_triton quantize --format nvfp4` (whole process);
- ModelOpt (with --modelopt): from_pretrained + mtq.quantize(W4A16_NVFP4_CFG) + export_hf_checkpoint.
Prints best-of-N seconds and the ratios last.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEDIUM = dict(
    hidden_size=1024, intermediate_size=2048, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=4096,
)  # fmt: skip

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
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.config.architectures = ["Qwen3MoeForCausalLM"]
mtq.quantize(model, copy.deepcopy(mtq.W4A16_NVFP4_CFG))
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


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{run.stderr[-2000:]}")
    return time.perf_counter() - start, run.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modelopt", action="store_true", help="also time ModelOpt's load+quantize+export")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=os.environ.get("MOEQ_TRITON_CACHE", Path.home() / ".cache" / "moeq-triton"))
    args = parser.parse_args()

    source = medium_checkpoint(Path(args.cache))
    size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    work = Path(tempfile.mkdtemp())
    best: dict[str, float] = {}
    read_in_process = []
    for _ in range(args.repeats):
        seconds, out = timed([sys.executable, "-c", READ, str(source)], env)
        read_in_process.append(float(out.split()[-1]))
        best["read (whole process)"] = min(best.get("read (whole process)", 1e9), seconds)
        cmd = [sys.executable, "-m", "moeq_triton", "quantize", "--model", str(source), "--out", str(work / "ours"),
               "--overwrite", "--device", args.device]  # fmt: skip
        seconds, out = timed(cmd, env)
        best["moeq-triton quantize (whole process)"] = min(
            best.get("moeq-triton quantize (whole process)", 1e9), seconds
        )
        if args.modelopt:
            shutil.rmtree(work / "modelopt", ignore_errors=True)
            seconds, _ = timed([sys.executable, "-c", MODELOPT, str(source), str(work / "modelopt")], env)
            best["ModelOpt load+quantize+export (whole process)"] = min(
                best.get("ModelOpt load+quantize+export (whole process)", 1e9), seconds
            )
    best["read floor (in process, after imports)"] = min(read_in_process)
    print(f"MEDIUM: {size / 1e6:.0f} MB in {len(list(source.glob('*.safetensors')))} shards; best of {args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:48s} {seconds:8.2f} s")
    ours = best["moeq-triton quantize (whole process)"]
    print(f"  ours / read floor (whole process): {ours / best['read (whole process)']:.2f}x")
    if args.modelopt:
        print(
            f"  ModelOpt / ours (whole process):   {best['ModelOpt load+quantize+export (whole process)'] / ours:.2f}x"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""FP8-block sources fused into the kernels vs dequantize-then-quantize, checked bitwise, then timed (issue 25).

    python -m benchmarks.source_throughput [--device cuda|cpu] [--experts 8] [--layers 1] [--model DeepSeek-V3]

Per output (amax, NVFP4, FP8 per tensor / per channel, fp8-block): the fused call on ``FP8BlockSource`` experts
must equal, byte for byte, the same call on the bf16 tensors ``dequantize_fp8_block`` makes (a mismatch stops the
run); then both routes are timed (the two-pass route includes its dequantization) and the table gives source
bytes read per second of the fused route and the ratio.  GPU: do_bench medians; CPU: a smoke run of the same
code (the fused path there is the interpreter or the dequantizing fallback; its times are not GPU claims).
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.run import median_seconds
from moeq_triton.kernels import (
    FP8BlockSource,
    dequantize_fp8_block,
    grouped_amax,
    grouped_row_amax,
    quantize_fp8,
    quantize_fp8_block,
    quantize_nvfp4,
)
from moeq_triton.testing import MODEL_SHAPES, assert_bitwise_equal, assert_results_equal


def sources(model: str, layers: int, experts: int, device: str) -> list[FP8BlockSource]:
    """Expert weights as a DeepSeek-style checkpoint stores them: e4m3 codes of amax-scaled blocks."""
    shape = next(m for m in MODEL_SHAPES if m.name == model)
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(layers * experts):
        for n, k in (shape.fc1, shape.fc2):
            w = torch.randn(n, k, generator=gen, device=device) * 0.02
            scale = torch.rand(-(-n // 128), -(-k // 128), generator=gen, device=device) * 1e-4 + 1e-5
            codes = (w / scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]).clamp(-448, 448)
            out.append(FP8BlockSource(codes.to(torch.float8_e4m3fn), scale))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="DeepSeek-V3")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    src = sources(args.model, args.layers, args.experts, args.device)
    amax = grouped_amax(src)
    rows_amax = grouped_row_amax(src)
    calls = {
        "amax": lambda ws: grouped_amax(ws),
        "nvfp4": lambda ws: quantize_nvfp4(ws, amax),
        "fp8": lambda ws: quantize_fp8(ws, amax),
        "fp8_channel": lambda ws: quantize_fp8(ws, rows_amax, per_channel=True),
        "fp8_block": lambda ws: quantize_fp8_block(ws),
    }

    def two_pass(call):
        return call(dequantize_fp8_block([s.codes for s in src], [s.scale_inv for s in src]))

    nbytes = sum(s.codes.numel() + s.scale_inv.numel() * 4 for s in src)
    print(f"{args.model}, {len(src)} weights, {nbytes / 1e9:.3f} GB of codes + scales, {args.device}")
    print(f"{'output':<12}{'fused ms':>10}{'two-pass ms':>13}{'fused GB/s':>12}{'speed-up':>10}  bitwise")
    for name, call in calls.items():
        fused, reference = call(src), two_pass(call)
        if name == "amax":
            assert_bitwise_equal(fused, reference, "amax: fused vs two-pass")
        else:
            for i, (a, b) in enumerate(zip(fused, reference)):
                assert_results_equal(a, b, f"{name} weights[{i}]: fused vs two-pass")
        t_fused = median_seconds(lambda call=call: call(src), args.device, args.reps)
        t_two = median_seconds(lambda call=call: two_pass(call), args.device, args.reps)
        gbs = nbytes / t_fused / 1e9
        print(f"{name:<12}{t_fused * 1e3:>10.3f}{t_two * 1e3:>13.3f}{gbs:>12.1f}{t_two / t_fused:>9.2f}x  equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())

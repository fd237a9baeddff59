"""Weight calibration inside ModelOpt: ``triton_grouped`` vs ModelOpt's ``max``, at real expert counts.

    python benchmarks/calibration.py [--model qwen3-30b-a3b] [--layout fused per-expert] [--repeats 3]
                                     [--per-expert-max-repeats 1]

Python cost depends on how many modules and quantizers a model has, not on tensor sizes, so the
models have the real layer and expert counts (Qwen3-30B-A3B: 48 x 128, Qwen3-235B-A22B: 94 x 128) and
tiny dimensions.  Two layouts: transformers' fused experts (3-D ``gate_up_proj``/``down_proj``) and one
``nn.Linear`` per expert projection.  Each measurement runs in a fresh process (interleaved between
the two calibrators), best of ``--repeats``; ``mtq.quantize`` and ``mtq.calibrate`` alone are timed
in the same process, with the phase breakdown of the latter.  Runs on CPU and GPU (``--device``).
``max`` with one module per expert takes minutes per process at full counts (its weight-access name
scan grows with the square of the module count): ``--per-expert-max-repeats`` caps its repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

COUNTS = {"qwen3-30b-a3b": (48, 128), "qwen3-235b-a22b": (94, 128)}
CALIBRATORS = ("max", "triton_grouped")


def build(layers: int, experts: int, layout: str, device: str):
    """A Qwen3-MoE with real counts and tiny dims; per-expert: one nn.Linear per expert projection."""
    import torch
    from torch import nn
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP

    cfg = Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=experts,
        num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=64,
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    if layout == "per-expert":
        for layer in model.model.layers:
            layer.mlp.experts = nn.ModuleList(
                Qwen3MoeMLP(cfg, intermediate_size=cfg.moe_intermediate_size) for _ in range(experts)
            )
    model = model.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device))
    return model


def config(calibrator: str) -> dict:
    import copy

    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.W4A16_NVFP4_CFG)
    if calibrator != "max":
        import moeq_triton

        cfg = copy.deepcopy(moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    return cfg


def worker(args: argparse.Namespace) -> dict:
    """One process: mtq.quantize on one model, then apply_mode + mtq.calibrate alone on another."""
    import torch
    from modelopt.torch.opt import apply_mode
    from modelopt.torch.quantization import mode as qmode
    from modelopt.torch.quantization import model_quant

    if args.calibrator != "max":  # the max rows run ModelOpt alone, without our patches in the way
        import moeq_triton  # noqa: F401

    layers, experts = COUNTS[args.model]
    layers = args.layers or layers
    cfg = config(args.calibrator)
    result: dict[str, float] = {}

    model = build(layers, experts, args.layout, args.device)
    t0 = time.perf_counter()
    model_quant.quantize(model, cfg)
    result["quantize_s"] = time.perf_counter() - t0
    del model

    phases: dict[str, float] = {"algorithm": 0.0, "metadata": 0.0}
    timed = []

    def timer(holder, attribute: str, phase: str) -> None:
        original = getattr(holder, attribute)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                phases[phase] += time.perf_counter() - start

        setattr(holder, attribute, wrapper)
        timed.append((holder, attribute, original))

    model = build(layers, experts, args.layout, args.device)
    model = apply_mode(model, mode=[("quantize", cfg)], registry=qmode.QuantizeModeRegistry)
    timer(qmode.MaxCalibrateModeDescriptor, "_calib_func", "algorithm")
    timer(qmode, "update_quantize_metadata", "metadata")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model_quant.calibrate(model, algorithm=cfg["algorithm"])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    result["calibrate_ms"] = (time.perf_counter() - t0) * 1e3
    for holder, attribute, original in timed:
        setattr(holder, attribute, original)
    result["algorithm_ms"] = phases["algorithm"] * 1e3
    result["metadata_ms"] = phases["metadata"] * 1e3
    result["other_ms"] = result["calibrate_ms"] - result["algorithm_ms"] - result["metadata_ms"]
    result["quantizers"] = sum(1 for n, _ in model.named_modules() if n.endswith("quantizer") or "quantizers." in n)
    return result


def run_once(model: str, layout: str, calibrator: str, device: str, layers: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--layout", layout[0], "--device", device]
    cmd += ["--layers", str(layers)]
    cmd += ["--calibrator", calibrator]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({model}, {layout}, {calibrator}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["qwen3-30b-a3b"], choices=sorted(COUNTS))
    parser.add_argument("--layout", nargs="+", default=["fused", "per-expert"], choices=["fused", "per-expert"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--per-expert-max-repeats", type=int, default=0, help="repeats of max, per-expert layout (0: --repeats)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=0, help="override the layer count (0: the model's)")
    parser.add_argument("--calibrator", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.model, args.layout = args.model[0], args.layout[0]
        print(json.dumps(worker(args)))
        return

    rows = []
    for model in args.model:
        for layout in args.layout:
            best: dict[str, dict] = {}
            max_repeats = args.per_expert_max_repeats if layout == "per-expert" else 0
            for repeat in range(args.repeats):  # interleaved: both calibrators see the same machine load
                for calibrator in CALIBRATORS:
                    if calibrator == "max" and max_repeats and repeat >= max_repeats:
                        continue
                    r = run_once(model, [layout], calibrator, args.device, args.layers)
                    b = best.setdefault(calibrator, r)
                    for key in ("quantize_s", "calibrate_ms"):
                        if r[key] < b[key]:
                            best[calibrator] = r if key == "calibrate_ms" else {**b, key: r[key]}
                            b = best[calibrator]
            rows.append((model, layout, best))
            print(f"load average after {model} {layout}: {os.getloadavg()}", flush=True)
            print_rows([rows[-1]])
    print()
    print_rows(rows)


def print_rows(rows) -> None:
    print(
        "| model | layout | quantizers | calibrator | mtq.quantize s | mtq.calibrate ms "
        "| algorithm ms | metadata ms | other ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model, layout, best in rows:
        base = best["max"]
        for calibrator in CALIBRATORS:
            r = best[calibrator]
            q = f"{r['quantize_s']:.2f}" + (
                "" if calibrator == "max" else f" ({base['quantize_s'] / r['quantize_s']:.1f}x)"
            )
            c = f"{r['calibrate_ms']:.0f}" + (
                "" if calibrator == "max" else f" ({base['calibrate_ms'] / r['calibrate_ms']:.1f}x)"
            )
            print(
                f"| {model} | {layout} | {r['quantizers']} | {calibrator} | {q} | {c} | {r['algorithm_ms']:.0f} "
                f"| {r['metadata_ms']:.0f} | {r['other_ms']:.0f} |"
            )


if __name__ == "__main__":
    main()

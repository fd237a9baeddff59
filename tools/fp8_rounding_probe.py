"""Which formula does ModelOpt's per-tensor FP8 export (``to_quantized_weight``) follow on this device?

    python -m tools.fp8_rounding_probe [--device cuda]

``(w / scale).to(float8_e4m3fn)`` with a bf16/fp16 ``w`` and a 0-dim float32 ``scale`` on the same device.
Candidates: the quotient of w and the float32 scale rounded once to w's dtype (CPU, observed), or the
scale itself first rounded to w's dtype (CUDA, read from torch's TensorIterator).  Prints which candidate
equals ModelOpt bit for bit on heavy-tailed random weights, per dtype.
"""

from __future__ import annotations

import argparse

import torch
from modelopt.torch.export.model_config import QUANTIZATION_FP8
from modelopt.torch.export.quant_utils import to_quantized_weight

from moeq_triton.synthetic import heavy_tailed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = parser.parse_args().device
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        w = heavy_tailed((512, 512), gen, dtype, scale=7.0).to(device)
        scale = (w.abs().amax().float() / 448.0).to(device)  # as the exporter computes it: float32, 0-dim
        modelopt = to_quantized_weight(w, scale, QUANTIZATION_FP8).view(torch.uint8)
        candidates = {
            "e4m3(dtype(w / s_fp32))": (w.float() / scale).to(dtype).to(torch.float8_e4m3fn),
            "e4m3(dtype(w / dtype(s)))": (w.float() / scale.to(dtype).float()).to(dtype).to(torch.float8_e4m3fn),
            "e4m3(w / s_fp32) single rounding": (w.float() / scale).to(torch.float8_e4m3fn),
        }
        for name, q in candidates.items():
            differ = int((q.view(torch.uint8) != modelopt).sum())
            print(f"FP8 probe {device} {str(dtype):15} {name:34} differs from ModelOpt in {differ}/{w.numel()}")


if __name__ == "__main__":
    main()

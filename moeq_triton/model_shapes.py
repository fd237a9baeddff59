"""Moved to ``benchmarks/common.py`` (not shipped in the wheel); this re-export remains until
benchmarks/run.py, tile_sweep.py, test_throughput.py and tests/test_kernels.py import from there."""

try:
    from benchmarks.common import DEEPSEEK_V3, MODEL_SHAPES, QWEN3_30B_A3B, QWEN3_235B_A22B, MoEShape  # noqa: F401
except ImportError:  # a script run from benchmarks/ has that folder, not the repository root, on sys.path
    from common import DEEPSEEK_V3, MODEL_SHAPES, QWEN3_30B_A3B, QWEN3_235B_A22B, MoEShape  # noqa: F401

#!/usr/bin/env bash
# One prepared run on a lent GPU (an H200 here): bitwise kernel checks on the device (FP8-block sources
# fused into the kernels included), the FP8 rounding probe, a sweep of tile choices, the fused sources'
# bitwise check and throughput against dequantize-then-quantize, then the throughput benchmark with the
# fastest tiles; its table is printed last.  Under 7 minutes.
#
# The device image has torch and triton but not ModelOpt: carry its pure-Python wheels (and the few it
# needs that the image lacks) in .whl/, named in the device tool's `carry`.  Fetch them once, here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl nvidia-modelopt==0.47.0 pydantic==2.14.4 \
#     pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
#     omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 pulp==3.3.2
# Then: bash benchmarks/device_check.sh   (logs and results.json land in $OUT, or ./device-out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package without building it (moeq_triton/ holds kernels/ itself).
rm -rf /tmp/moeq_pkg && mkdir -p /tmp/moeq_pkg && cp -r moeq_triton /tmp/moeq_pkg/
export PYTHONPATH=/tmp/moeq_pkg:$PYTHONPATH PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    $PY -c "import torch, triton, modelopt; print('torch', torch.__version__, 'triton', triton.__version__, 'modelopt', modelopt.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/environment.txt"

status=0
echo "== bitwise kernel tests on the GPU (tests/kernels/, MOEQ_TEST_DEVICE=cuda; FP8-block sources fused)"
MOEQ_TEST_DEVICE=cuda timeout 200 $PY -P -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py \
    tests/kernels/test_kernel_host.py tests/kernels/test_fp8_block_source.py \
    "tests/kernels/test_fp8_block.py::test_kernel_equals_reference_and_modelopt" --maxfail=10 2>&1 \
    | tee "$OUT/pytest.txt" | tail -n 25 || status=1
echo "== static SASS budget (offline compile, as on a CPU)"
timeout 120 $PY -m benchmarks.kernel_report --arch 90,100 2>&1 | tee "$OUT/kernel_report.txt" || status=1
echo "== rcp.approx.ftz.f32 and NVFP4's refined reciprocal over every mantissa"
timeout 60 $PY -m benchmarks.rcp_probe 2>&1 | grep -v Warning | tee "$OUT/rcp_probe.txt" || status=1
echo "== FP8 export rounding on CUDA"
timeout 60 $PY -m benchmarks.fp8_rounding_probe --device cuda 2>&1 | grep -v Warning | tee "$OUT/fp8_probe.txt" || status=1
echo "== tile sweep"
timeout 120 $PY -m benchmarks.tile_sweep --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/tile_sweep.txt" || status=1
TILES=()
[ -f "$OUT/tiles.json" ] && TILES=(--tiles "$OUT/tiles.json")
echo "== FP8-block sources: fused == dequantize-then-quantize (bitwise), then both timed"
timeout 120 $PY -m benchmarks.source_throughput --device cuda --experts 32 2>&1 | grep -v Warning \
    | tee "$OUT/source_throughput.txt" || status=1
echo "== benchmark"
timeout 200 $PY -m benchmarks.run --out "$OUT" "${TILES[@]}" 2>&1 | grep -v -E "Inserted [0-9]+ quantizers|Warning|warn" \
    | tee "$OUT/benchmark.txt" || status=1
exit $status

#!/usr/bin/env bash
# The GPU checks of the custom-op library in one run, for a lent GPU machine (nvcc, torch, a CPU-only
# onnxruntime, no network): build for sm_90, the custom-op tests (CUDA ones through the C entry
# point), then the CUDA FFN benchmark (the grid, one 7B-sized FFN, the fused form). Run from the
# repository root with the ONNX Runtime headers:
#   ORT_INCLUDE_DIR=build/ort-headers/usr/include bash custom_ops/gpu_check.sh OUT_DIR
set -u -o pipefail
out=${1:-out/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TARDIS_CUDA_ARCHS=${TARDIS_CUDA_ARCHS:-90}
# Without an install, tardis_onnx.passes (shipped from passes/ by pyproject's package-dir) needs a link.
[ -e tardis_onnx/passes ] || ln -s ../passes tardis_onnx/passes
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv && python3 custom_ops/build.py --force; } 2>&1 |
  tee "$out/build.log" || exit 1
python3 -m pytest -q -ra -p no:cacheprovider tests/test_custom_op.py 2>&1 | tee "$out/tests.log"
python3 benchmarks/ffn_latency_cuda.py --out "$out" 2>&1 | tee "$out/bench.log"
# A 7B-sized GELU FFN (d = 4096, h = 16384): decode at batch 1 is bandwidth-bound there.
python3 benchmarks/ffn_latency_cuda.py --dims 4096 --tokens 1 --fractions 0.05 --dtypes fp16 --out "$out/d4096"
# The fused form the optimizer emits with the low-rank predictor (the kernel computes z_hat itself).
python3 benchmarks/ffn_latency_cuda.py --form fused --dims 1024 4096 --tokens 1 128 --fractions 0.05 --out "$out/fused" 2>&1 |
  tee "$out/bench_fused.log"

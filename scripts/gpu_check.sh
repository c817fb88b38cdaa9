#!/usr/bin/env bash
# The checks that need a GPU, in under 5 minutes on an H100/H200-class machine:
#  1. the CUDA tests: the Triton kernels compiled for the device, bit for bit against the
#     stream's definition and the CPU kernel, launches and host syncs counted;
#  2. benchmarks/bench_cuda.py: per dtype, achieved GB/s and % of the device's peak for the mask, a
#     plain torch._foreach_mul_ of the same gradients (one read+write pass, the floor) and
#     AdamW(fused=True), plus kernel launches and host syncs per call / per step.
# Both run even if the other fails; the exit status is non-zero if either did.
# Run from anywhere: bash scripts/gpu_check.sh [OUT_DIR]   (default: gpu_check_out)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
unset TRITON_INTERPRET  # compile the kernels for the GPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device here; this script checks the GPU backend")
import triton
print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}")
PY
status=0
HF_HUB_OFFLINE=1 timeout 170 python -m pytest -q -ra \
    tests/test_kernels_triton.py tests/test_cuda.py tests/test_kernels.py tests/test_functional.py \
    2>&1 | tee "$out/gpu_tests.txt" || status=1
timeout 110 python -m benchmarks.bench_cuda --repeats 20 --json "$out/bench_cuda.json" \
    2>&1 | tee "$out/bench_cuda.txt" || status=1
echo "gpu_check.sh: outputs in $out (status $status)"
exit $status

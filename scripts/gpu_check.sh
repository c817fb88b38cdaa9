#!/usr/bin/env bash
# The checks that need a GPU, in under 5 minutes: the CUDA tests (the Triton kernels compiled, bit
# for bit against the stream's definition and the CPU kernel; no host synchronisation in a step)
# and the overhead benchmark on the GPU. Run from anywhere: bash scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
unset TRITON_INTERPRET  # compile the kernels for the GPU
python - <<'PY'
import torch, triton
assert torch.cuda.is_available(), "no CUDA device: this script checks the GPU backend"
print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}")
PY
HF_HUB_OFFLINE=1 timeout 240 python -m pytest -q -ra \
    tests/test_kernels_triton.py tests/test_cuda.py tests/test_kernels.py tests/test_functional.py \
    2>&1 | tee "$out/gpu_tests.txt"
timeout 200 python scripts/bench_overhead.py --device cuda --repeats 20 \
    --json "$out/bench_overhead_cuda.json" 2>&1 | tee "$out/bench_overhead_cuda.txt"

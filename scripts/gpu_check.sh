#!/usr/bin/env bash
# The checks that need a GPU, within a time budget, every output kept under one folder:
#  1. the CUDA tests: the Triton kernels compiled for the device, bit for bit against the
#     stream's definition and the CPU kernel (runs of column shards included), launches and
#     host syncs counted (tests/test_cuda.py, tests/test_kernels_triton.py, and the triton
#     cases of tests/test_backends.py);
#  2. benchmarks/bench_cuda.py: per dtype, achieved GB/s and % of the device's peak for the mask,
#     a plain torch._foreach_mul_ of the same gradients (one read+write pass, the floor) and
#     AdamW(fused=True), plus kernel launches and host syncs per call / per step.
#
# Usage, from anywhere: bash scripts/gpu_check.sh OUT_DIR [BUDGET_SECONDS]   (default 270 s)
#
# Written for the GPU machines this project may be lent: `python3` (no `python`), no internet,
# torch with CUDA and Triton installed. It builds nothing (the C++ CPU kernel is skipped:
# HF_DROPGRAD_DISABLE_EXTENSION=1) and runs no CPU-only test file. Every step writes as it goes
# (PYTHONUNBUFFERED=1, tee) into OUT_DIR: env.txt, gpu_tests.txt (+ gpu_tests.xml when pytest
# finishes), bench_cuda.txt (+ bench_cuda.json), status.txt (one line per step: name, exit
# status, seconds). A step that would outlast the budget is stopped (`timeout`), the next still
# runs if time is left, and what was written stays. Exit status: 0 all passed, 1 a step failed
# or was stopped, 2 no CUDA device here. (GPU_CHECK_WITHOUT_GPU=1 runs the steps anyway: only
# tests/test_gpu_check.py uses it, to check the budget and the outputs on a machine without.)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash scripts/gpu_check.sh OUT_DIR [BUDGET_SECONDS]}"
budget="${2:-270}"
mkdir -p "$out"
start=$(date +%s)
export PYTHONUNBUFFERED=1 HF_DROPGRAD_DISABLE_EXTENSION=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET  # compile the kernels for the GPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$out/status.txt"

left() { echo $(( budget - ($(date +%s) - start) )); }

# step NAME SHARE LOG COMMAND...: run COMMAND under a timeout of SHARE percent of the time
# left, its output shown and written to LOG as it comes; record its status in status.txt
step() {
    local name="$1" share="$2" log="$3"; shift 3
    local limit=$(( $(left) * share / 100 ))
    if (( limit < 10 )); then
        echo "$name skipped: budget spent" | tee -a "$out/status.txt"
        status=1
        return
    fi
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit" | tee -a "$out/status.txt"
    (( rc == 0 )) || status=1
}

python3 - > "$out/env.txt" 2>&1 <<'PY'
import sys
import torch
import os
if not torch.cuda.is_available():
    print("gpu_check.sh: no CUDA device here; this script checks the GPU backend")
    sys.exit(0 if os.environ.get("GPU_CHECK_WITHOUT_GPU") == "1" else 2)
import triton
print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}, "
      f"CUDA {torch.version.cuda}, capability {torch.cuda.get_device_capability()}")
PY
rc=$?
cat "$out/env.txt"
if (( rc != 0 )); then
    echo "env rc=$rc" >> "$out/status.txt"
    exit 2
fi

status=0
step tests 60 "$out/gpu_tests.txt" python3 -m pytest -q -ra -p no:cacheprovider \
    --junitxml="$out/gpu_tests.xml" tests/test_cuda.py tests/test_kernels_triton.py \
    tests/test_backends.py -k "triton or cuda"
step bench_cuda 90 "$out/bench_cuda.txt" python3 -m benchmarks.bench_cuda --repeats 20 \
    --json "$out/bench_cuda.json"
echo "gpu_check.sh: outputs in $out (status $status, $(( $(date +%s) - start )) s of $budget)"
exit $status

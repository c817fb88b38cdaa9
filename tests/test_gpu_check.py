"""scripts/gpu_check.sh, as far as a machine without a GPU can run it: it is written for the GPU
machines this project may be lent (``python3``, no ``python``; nothing to build; everything
under the folder it is given), refuses to run without CUDA, and stops within its budget keeping
what it wrote."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_the_script_runs_python3_unbuffered_and_builds_nothing() -> None:
    text = SCRIPT.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(^|[\s(])python(\s|$)", code), "a bare `python`: not on the machine"
    assert "python3 -m pytest" in code and "python3 -m benchmarks.bench_cuda" in code
    assert "PYTHONUNBUFFERED=1" in code and "HF_DROPGRAD_DISABLE_EXTENSION=1" in code
    cpu_only = ["test_kernels_cpp.py", "test_trainer.py", "test_distributed.py"]
    assert not any(name in code for name in cpu_only)


def _run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], cwd="/", env=environ,
                          capture_output=True, text=True, timeout=300)


def test_without_cuda_it_says_so_and_exits_2(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _run(tmp_path / "out")
    assert proc.returncode == 2
    assert "no CUDA device" in (tmp_path / "out" / "env.txt").read_text()


@pytest.mark.slow
def test_the_steps_keep_to_the_budget_and_their_outputs_stay(tmp_path: Path) -> None:
    """A 25 s budget: each step runs under a timeout of its share of what is left (or is skipped
    when too little is), the whole stays within the budget, and every step's status and output
    stay in the folder. (Without CUDA the benchmark exits 2, so the run fails: status 1.)"""
    import time

    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = _run(out, "25", GPU_CHECK_WITHOUT_GPU="1")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert elapsed < 25 + 15, elapsed  # the budget, plus the kill grace and start-up
    status = (out / "status.txt").read_text().splitlines()
    assert [line.split()[0] for line in status] == ["tests", "bench_cuda"], status
    limit = int(re.search(r"limit=(\d+)", status[0]).group(1))
    assert 10 <= limit <= 15, status  # 60 % of what is left of the 25 s after the device check
    assert (out / "gpu_tests.txt").exists()
    assert "skipped: budget spent" in status[1] or (out / "bench_cuda.txt").exists()
    assert "of 25" in proc.stdout

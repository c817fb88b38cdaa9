"""The built wheel ships what the package loads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hf_dropgrad.kernels import cpp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_contains_the_cpp_source_where_the_loader_looks(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("hf_dropgrad-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    source = cpp._SOURCE_PATH.relative_to(ROOT).as_posix()
    assert source == "hf_dropgrad/kernels/csrc/mask_cpu.cpp"
    assert source in names
    assert {"hf_dropgrad/kernels/triton.py", "hf_dropgrad/kernels/reference.py"} <= names
    integrations = ("deepspeed", "fsdp", "accelerate", "in_backward")
    assert {f"hf_dropgrad/integrations/{m}.py" for m in integrations} <= names
    assert not any(name.startswith("tests/") for name in names)

"""The Triton kernels' compiled code, read on a machine without a GPU (docs/design.md, "The GPU
kernels").

``scripts/inspect_kernels.py`` compiles every variant the backend launches for sm_80 and sm_90
with the ``ptxas`` that Triton's wheel ships; this test reads the cubins again with
``cuobjdump`` (not through the script's parser) and holds the masking kernels to their targets:
at most 64 registers per thread, no spills, no local memory, and 128-bit loads and stores on the
aligned path. It also checks that every launch the backend makes (observed from outside, under
the interpreter) is a variant the script compiled. Skipped only where Triton's NVIDIA backend is
absent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
if not ((BIN / "ptxas").is_file() and (BIN / "cuobjdump").is_file()):
    pytest.skip("Triton's NVIDIA backend (ptxas, cuobjdump) is absent", allow_module_level=True)
pytest.importorskip("triton.backends.nvidia.compiler")

from hf_dropgrad.kernels import triton as K  # noqa: E402
from tests import stream_oracle as oracle  # noqa: E402
from tests.triton_launches import observe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The interpreter computes in numpy: inf * 0 and float16 overflow warn there, as intended.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
ARCHS = (80, 90)
KEYS = {"kernel", "variant", "arch", "dtype", "aligned", "role", "cubin"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "inspect_kernels.py"), "--arch",
         *map(str, ARCHS), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "regs" in done.stdout and "occupancy" in done.stdout  # the printed table
    return out, json.loads((out / "kernels.json").read_text())


def _cuobjdump(*args: str) -> str:
    return subprocess.run([str(BIN / "cuobjdump"), *args], check=True, capture_output=True,
                          text=True).stdout


def test_kernels_json_lists_every_variant_for_every_arch(compiled) -> None:
    out, records = compiled
    assert {(r["variant"], r["arch"]) for r in records} == {
        (name, arch) for name in K.VARIANTS for arch in ARCHS
    }
    for r in records:
        assert KEYS <= r.keys()
        v = K.VARIANTS[r["variant"]]
        assert r["kernel"] == v.kernel.fn.__name__ and r["role"] == v.role
        assert r["aligned"] == v.aligned and isinstance(r["arch"], int)
        assert r["dtype"] == (None if v.dtype is None else str(v.dtype).removeprefix("torch."))
        assert (out / r["cubin"]).is_file()
    masks = [r for r in records if r["role"] == "mask"]
    assert {(r["dtype"], r["aligned"]) for r in masks} == {
        (d, a) for d in ("float32", "bfloat16", "float16") for a in (True, False)
    }


def test_mask_kernels_meet_the_register_spill_and_width_targets(compiled) -> None:
    out, records = compiled
    for r in (r for r in records if r["role"] == "mask"):
        cubin = str(out / r["cubin"])
        usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)",
                          _cuobjdump("-res-usage", cubin))
        assert usage is not None
        registers, stack, local = map(int, usage.groups())
        where = f"{r['variant']} sm_{r['arch']}"
        assert registers <= 64, f"{where}: {registers} registers"
        assert stack == 0 and local == 0, f"{where}: stack {stack}, local {local}"
        sass = _cuobjdump("-sass", cubin)
        assert not re.search(r"\b(LDL|STL)\b", sass), f"{where} spills"
        stores = re.findall(r"\bSTG((?:\.[A-Z0-9_]+)*)", sass)
        loads = re.findall(r"\bLDG((?:\.[A-Z0-9_]+)*)", sass)
        assert stores, where
        # one gradient load per gradient store; the rest is the map entry (3 words: the row,
        # the run, the chunk in the run) and the 7 used words of the table row: two dependent
        # loads and no search over the table (the first kernel made 13 such loads in a chain)
        assert len(loads) - len(stores) <= 10, f"{where}: {loads}"
        if r["aligned"]:
            # every gradient store is 128-bit, and so are the gradient loads (the others read
            # the map entry and the table row: 32- and 64-bit scalars)
            assert all(".128" in s for s in stores), f"{where}: {stores}"
            assert sum(".128" in s for s in loads) == len(stores), f"{where}: {loads}"
        else:
            assert not any(".128" in s for s in stores), f"{where}: {stores}"


def test_no_kernel_has_a_stack_frame_local_memory_or_spills(compiled) -> None:
    """Every variant, masking and full update drop's count and moves: registers only (the
    count kernel once packed partial sums through an 8-byte stack frame)."""
    out, records = compiled
    for r in records:
        where = f"{r['variant']} sm_{r['arch']}"
        usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)",
                          _cuobjdump("-res-usage", str(out / r["cubin"])))
        assert usage is not None, where
        registers, stack, local = map(int, usage.groups())
        assert (stack, local) == (0, 0) == (r["stack_bytes"], r["local_bytes"]), where
        assert registers <= 64 and r["spill_instructions"] == 0, f"{where}: {registers}"


def test_every_launch_is_a_compiled_variant(compiled) -> None:
    """Masking (every dtype, both paths) and full update drop (every element size) launch only
    variants that inspect_kernels.py compiled, and between them every variant."""
    if not K.interpreting() and not torch.cuda.is_available():
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, records = compiled
    with observe(K) as seen:
        for dtype in oracle.DTYPES:
            buffer = oracle.grad(4096 + 16, dtype).to(device)
            K.mask_([buffer[:4096], buffer[4097:4100]], [1, 2], [6554] * 2, [1.1] * 2, [0, 3])
        for dtype in oracle.PACK_DTYPES:  # element sizes 4, 2, 2, 8, 1
            x = oracle.filled(100, dtype).to(device)
            values, starts = K.gather_dropped_many([x], [3], [32768], [0])
            K.scatter_dropped_many([x], [3], [32768], [0], None, None, values, starts)
    assert set(seen.variants) == set(K.VARIANTS) == {r["variant"] for r in records}

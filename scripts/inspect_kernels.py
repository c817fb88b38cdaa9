"""Compile every Triton kernel variant of the GPU backend for NVIDIA targets and read the code.

No GPU is needed: Triton's NVIDIA backend compiles for a ``GPUTarget`` with the ``ptxas`` its
wheel ships, and ``cuobjdump`` (shipped too) reads the cubins. The variants, their signatures and
compile-time constants come from ``hf_dropgrad.kernels.triton.VARIANTS``, the registry every
launch goes through, so what is compiled here is what the backend launches.

For each architecture and variant it writes ``OUT/<variant>.sm<arch>.cubin`` and, in
``OUT/kernels.json``, a list of objects with ``kernel`` (the ``@triton.jit`` function's name),
``variant``, ``arch``, ``dtype`` (``float32``/``bfloat16``/``float16`` or null), ``aligned``
(bool or null), ``role`` (``mask``, ``count``, ``gather``, ``scatter``), ``cubin`` (relative to
``OUT``) and the figures: ``registers``, ``spill_instructions`` (``LDL``/``STL``),
``stack_bytes`` (the per-thread stack frame ``cuobjdump -res-usage`` reports), ``local_bytes``,
``shared_bytes``, ``loads`` / ``stores`` (global loads and stores by bit width) and
``occupancy`` (the share of an SM's warp slots the registers, shared memory and block size
allow). It prints them as a table.

``--baseline REF`` also compiles the first masking kernel (``_mask_kernel`` of
``hf_dropgrad/kernels/triton.py`` at git revision ``REF``, before the program map, with its
8-step binary search) for the comparison in docs/analysis.md.

Usage: ``python scripts/inspect_kernels.py --arch 80 90 --out DIR [--baseline c7357b8]``, with
``hf_dropgrad`` importable (installed, or ``PYTHONPATH=.`` from the repository root).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# Compile for the GPU, never for the interpreter (which Triton reads when a kernel is decorated).
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning

ROOT = Path(__file__).resolve().parent.parent

#: Per-SM limits: registers, warp slots, resident blocks, shared memory (bytes usable by blocks).
SM_LIMITS = {
    80: {"registers": 65536, "warps": 64, "blocks": 32, "shared": 164 * 1024},
    86: {"registers": 65536, "warps": 48, "blocks": 16, "shared": 100 * 1024},
    89: {"registers": 65536, "warps": 48, "blocks": 24, "shared": 100 * 1024},
    90: {"registers": 65536, "warps": 64, "blocks": 32, "shared": 228 * 1024},
}
_MEMORY_OP = re.compile(r"\b(LDG|STG|LDL|STL)((?:\.[A-Z0-9_]+)*)")


def tools() -> tuple[Path, Path]:
    """Paths of the ``ptxas`` and ``cuobjdump`` that Triton's NVIDIA backend ships."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas, cuobjdump = bin_dir / "ptxas", bin_dir / "cuobjdump"
    for tool in (ptxas, cuobjdump):
        if not tool.is_file():
            raise SystemExit(f"{tool} is missing: Triton's NVIDIA backend is not installed")
    return ptxas, cuobjdump


def compile_cubin(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], arch: int,
                  num_warps: int) -> tuple[bytes, str]:
    """(cubin, kernel name) of ``fn`` compiled for ``sm_<arch>``; no GPU involved."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = dict(signature) | {name: "constexpr" for name in constexprs}
    source = ASTSource(fn, full, constexprs=dict(constexprs))
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps})
    return kernel.asm["cubin"], kernel.metadata.name


def width(suffix: str) -> int:
    """Bits moved by a global/local load or store with these SASS modifiers."""
    for bits in ("128", "64"):
        if f".{bits}" in suffix:
            return int(bits)
    if ".U16" in suffix or ".S16" in suffix:
        return 16
    if ".U8" in suffix or ".S8" in suffix:
        return 8
    return 32


def read_cubin(path: Path, cuobjdump: Path) -> dict[str, Any]:
    """Registers, local/shared bytes and memory instructions of the one kernel in ``path``."""
    usage = subprocess.run([str(cuobjdump), "-res-usage", str(path)], check=True,
                           capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line for {path}:\n{usage}")
    registers, stack, shared, local = (int(x) for x in found.groups())
    sass = subprocess.run([str(cuobjdump), "-sass", str(path)], check=True,
                          capture_output=True, text=True).stdout
    loads: dict[int, int] = {}
    stores: dict[int, int] = {}
    spills = 0
    for op, suffix in _MEMORY_OP.findall(sass):
        if op in ("LDL", "STL"):
            spills += 1
            continue
        counts = loads if op == "LDG" else stores
        counts[width(suffix)] = counts.get(width(suffix), 0) + 1
    return {
        "registers": registers,
        "stack_bytes": stack,
        "local_bytes": local,
        "shared_bytes": shared,
        "spill_instructions": spills,
        "loads": {str(k): v for k, v in sorted(loads.items(), reverse=True)},
        "stores": {str(k): v for k, v in sorted(stores.items(), reverse=True)},
    }


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> float:
    """Share of the SM's warp slots that resident blocks of this kernel can fill."""
    limits = SM_LIMITS.get(arch, SM_LIMITS[90])
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256  # allocated per warp, by 256
    blocks = min(
        limits["registers"] // (per_warp * num_warps),
        limits["warps"] // num_warps,
        limits["blocks"],
        limits["shared"] // shared if shared else limits["blocks"],
    )
    return blocks * num_warps / limits["warps"]


def baseline_module(ref: str) -> Any:
    """The backend module as it was at git revision ``ref`` (for its first ``_mask_kernel``)."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:hf_dropgrad/kernels/triton.py"],
                          check=True, capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="dropgrad_baseline_"))
    path = folder / "dropgrad_triton_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("dropgrad_triton_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jobs(baseline: str | None) -> list[dict[str, Any]]:
    """What to compile: every registered variant (and the baseline mask kernels)."""
    from hf_dropgrad.kernels import triton as backend

    out = []
    for v in backend.VARIANTS.values():
        out.append({
            "fn": v.kernel, "signature": v.signature, "constexprs": v.constexprs,
            "num_warps": v.num_warps, "kernel": v.kernel.fn.__name__, "variant": v.name,
            "dtype": None if v.dtype is None else str(v.dtype).removeprefix("torch."),
            "aligned": v.aligned, "role": v.role,
        })
    if baseline:
        old = baseline_module(baseline)
        for dtype, kind in (("float32", 0), ("bfloat16", 1), ("float16", 2)):
            out.append({
                "fn": old._mask_kernel,
                "signature": {"table": "*i64", "starts": "*i64", "n_tensors": "i32"},
                "constexprs": {"SEARCH_STEPS": 8, "KIND": kind},  # 8 steps: 131 tensors
                "num_warps": 4, "kernel": "_mask_kernel", "variant": f"baseline_mask_{dtype}",
                "dtype": dtype, "aligned": None, "role": "baseline",
            })
    return out


def fmt_widths(counts: dict[str, int]) -> str:
    return " ".join(f"{n}x{w}" for w, n in counts.items()) or "-"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="SM versions to compile for (default: 80 90)")
    parser.add_argument("--out", type=Path, required=True, help="folder for cubins + kernels.json")
    parser.add_argument("--baseline", metavar="GITREF",
                        help="also compile the first _mask_kernel, from this git revision")
    args = parser.parse_args(argv)
    for arch in args.arch:
        if arch not in SM_LIMITS:
            parser.error(f"--arch {arch}: allowed values are {', '.join(map(str, SM_LIMITS))}")
    _, cuobjdump = tools()
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for arch in args.arch:
        for job in jobs(args.baseline):
            cubin, _ = compile_cubin(job["fn"], job["signature"], job["constexprs"], arch,
                                     job["num_warps"])
            name = f"{job['variant']}.sm{arch}.cubin"
            (args.out / name).write_bytes(cubin)
            figures = read_cubin(args.out / name, cuobjdump)
            record = {k: job[k] for k in ("kernel", "variant", "dtype", "aligned", "role")}
            record |= {"arch": arch, "cubin": name, "num_warps": job["num_warps"], **figures}
            record["occupancy"] = occupancy(figures["registers"], figures["shared_bytes"],
                                            job["num_warps"], arch)
            records.append(record)
    (args.out / "kernels.json").write_text(json.dumps(records, indent=1) + "\n")
    print(f"{'variant':28s} {'arch':>4s} {'regs':>4s} {'spill':>5s} {'stack':>5s} {'local':>5s} "
          f"{'shared':>6s} {'occupancy':>9s}  loads (count x bits)        stores")
    for r in records:
        print(f"{r['variant']:28s} sm{r['arch']:<2d} {r['registers']:4d} "
              f"{r['spill_instructions']:5d} {r['stack_bytes']:5d} {r['local_bytes']:5d} "
              f"{r['shared_bytes']:6d} "
              f"{100 * r['occupancy']:8.1f}%  {fmt_widths(r['loads']):27s} "
              f"{fmt_widths(r['stores'])}")
    print(f"wrote {len(records)} cubins and kernels.json to {args.out}")
    return records


if __name__ == "__main__":
    main()

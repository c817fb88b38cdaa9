"""Benchmark DropGrad's masking overhead and memory against a bare AdamW step.

Builds the t5-small parameter set (60.5M parameters, ``T5ForConditionalGeneration(T5Config())``
shapes; hard-coded shapes when transformers is missing) with random gradients and times, in one
run and interleaved repeat by repeat (so background load hits every contender alike):

* ``adamw``: a bare ``torch.optim.AdamW(params, foreach=True).step()`` (the reference);
* ``kernel``: the fused C++ kernel alone, ``ops.mask_`` (the op) over all gradients (p = 0.1,
  one key per tensor), and ``functional.mask_`` (the kernel plus its Python dispatch) when present;
* ``foreach_mul``: one read+write pass over every gradient (``torch._foreach_mul_``), the floor
  of any in-place masking;
* ``save+restore dropped``: full update drop's part alone, ``functional.save_dropped_many`` of
  every parameter then ``restore()`` (p as above);
* ``dropgrad``: when ``hf_dropgrad.DropGrad`` is importable, a full
  ``DropGrad(AdamW(...), drop_rate=p, full_update_drop=...).step()`` against the bare step of the
  same AdamW, for p in {0.1, 0.5}, fp32 and bf16 parameters/gradients, with and without full
  update drop (``--rates``, ``--dtypes`` narrow it).

Overhead ratio = (extra time) / (bare AdamW step), from medians over the repeats after warm-up.

Memory: in a fresh subprocess per method, the largest gradient
(the 32128 x 512 shared embedding, 16.4M elements) is allocated and touched, the kernel is warmed
up, the resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``), the method is
called once, and peak extra memory = ``VmHWM - VmRSS`` before the call, in bytes per element. This
counts every page the call touches (temporaries, thread stacks), at page granularity; a naive
``bernoulli(full_like(g))`` mask is measured the same way to show the probe sees full-size
temporaries. ``full_update_drop`` saves and restores the dropped values as full update drop does
around the inner step (compiled path; ``full_update_drop_step``: the gradient masked and the
parameter's values packed in one pass, as a DropGrad step does, then restored;
``full_update_drop_reference``: the ``masked_select`` path that non-contiguous parameters
take). Linux only.

Usage (from the repository root): ``python -m benchmarks.bench_overhead [--threads 2]
[--repeats 15] [--json out.json] [--sections kernel,dropgrad,memory] [--rates 0.1,0.5]
[--dtypes float32,bfloat16]``; the parameter set is ``benchmarks/shapes.py``'s.
``--device cuda [--peak-gbps N]`` benchmarks the Triton backend on the GPU instead
(``benchmarks/bench_cuda.py``).
On a machine shared with other jobs, 2-thread wall times of many-kernel steps (AdamW foreach:
dozens of OpenMP regions, each a barrier) inflate far more than the kernel's single region; check
the printed load average, and ``--threads 1 --clock cpu`` gives load-robust per-core ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.shapes import t5_small_shapes
from hf_dropgrad.kernels import cpp as _cpu_kernel
from hf_dropgrad.kernels import ops

RESOLUTION = 1 << 16
#: The repository root: each memory probe runs this module again, from there.
ROOT = Path(__file__).resolve().parents[1]


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=gen))
        p.grad = torch.empty(shape, dtype=dtype).normal_(0, 1e-3, generator=gen)
        params.append(p)
    return params


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    before: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every function, run in rotating order within each repeat; ``before``
    (untimed) runs before every call."""
    clock = _clock
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            if before is not None:
                before()
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if before is not None:
                before()
            t0 = clock()
            fns[name]()
            samples[name].append(clock() - t0)
    return samples


def summarize(samples: dict[str, list[float]], reference: str, extra: bool) -> dict[str, dict]:
    """Median/min in ms; ratio of the median time (``extra``: minus the reference) to it."""
    ref = statistics.median(samples[reference])
    out = {}
    for name, s in samples.items():
        med = statistics.median(s)
        row = {"median_ms": med * 1e3, "min_ms": min(s) * 1e3}
        if name != reference:
            row["overhead_x"] = ((med - ref) if extra else med) / ref
        out[name] = row
    return out


def kernel_section(params: list[torch.nn.Parameter], p: float, args: argparse.Namespace) -> dict:
    grads = [q.grad for q in params]
    threshold = min(RESOLUTION, round(p * RESOLUTION))
    scale = RESOLUTION / (RESOLUTION - threshold)
    keys = [(0x9E3779B97F4A7C15 * (i + 1)) % 2**64 for i in range(len(grads))]
    thresholds, scales = [threshold] * len(grads), [scale] * len(grads)
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    fns: dict[str, Callable[[], object]] = {
        "adamw": opt.step,
        "kernel": lambda: ops.mask_(grads, keys, thresholds, scales),
        "foreach_mul": lambda: torch._foreach_mul_(grads, 1.0),
    }
    try:
        from hf_dropgrad import functional

        fns["functional.mask_"] = lambda: functional.mask_(grads, keys, thresholds, scales)
        data = [q.detach() for q in params]
        if hasattr(functional, "save_dropped_many"):  # full update drop's save + restore
            fns["save+restore dropped"] = lambda: functional.save_dropped_many(
                data, keys, thresholds
            ).restore()
        else:  # before the batched version: one save and one restore per tensor

            def save_restore() -> None:
                saved = [functional.save_dropped(x, k, threshold) for x, k in zip(data, keys)]
                for s in saved:
                    s.restore()

            fns["save+restore dropped"] = save_restore
        if args.reference:

            def reference() -> None:
                for g, k in zip(grads, keys, strict=True):
                    functional.mask_reference_(g, k, threshold, scale)

            fns["reference"] = reference
    except ImportError:
        pass
    samples = time_interleaved(fns, args.warmup, args.repeats)
    return summarize(samples, "adamw", extra=False)


def wrapper_section(shapes: list[tuple[int, ...]], args: argparse.Namespace) -> dict | None:
    try:
        from hf_dropgrad import DropGrad
    except ImportError:
        return None
    results = {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for p in (float(r) for r in args.rates.split(",")):
            for full_update_drop in (False, True):
                # Fresh parameters and optimizer per case, and every call sees the same dense
                # gradients (restored, untimed, before it), as a training step sees fresh ones.
                # With one parameter set reused across cases and its gradients masked in place
                # call after call, the bare fp32 step of the later cases measured 300-350 ms
                # instead of 165-195 ms, which flattered their ratios.
                params = make_params(shapes, dtype)
                grads = [q.grad for q in params]
                fresh = [g.clone() for g in grads]
                opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
                dg = DropGrad(opt, drop_rate=p, full_update_drop=full_update_drop, seed=0)
                samples = time_interleaved(
                    {"adamw": opt.step, "dropgrad": dg.step},
                    args.warmup,
                    args.repeats,
                    before=lambda grads=grads, fresh=fresh: torch._foreach_copy_(grads, fresh),
                )
                name = f"{str(dtype).removeprefix('torch.')} p={p} full_update_drop="
                results[name + str(full_update_drop)] = summarize(samples, "adamw", extra=True)
                del dg, opt, params, grads, fresh
    return results


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_probe(method: str, numel: int, dtype_name: str) -> dict:
    """Run in a fresh process: peak extra resident memory of one masking call."""
    dtype = getattr(torch, dtype_name)
    g = torch.empty(numel, dtype=dtype).normal_()
    threshold, scale = 6554, RESOLUTION / (RESOLUTION - 6554)
    if method == "kernel":

        def call() -> None:
            ops.mask_([g], [12345], [threshold], [scale])
    elif method == "keep_mask":

        def call() -> None:
            ops.keep_mask_(torch.empty(numel, dtype=torch.bool), 12345, threshold, 0)
    elif method == "reference":
        from hf_dropgrad import functional

        def call() -> None:
            functional.mask_reference_(g, 12345, threshold, scale)
    elif method in ("full_update_drop", "full_update_drop_reference"):
        # what DropGrad(full_update_drop=True) adds around the inner step: save the dropped
        # values, put them back (p = 0.1: 0.4 B/element of fp32 values are the floor)
        from hf_dropgrad import functional

        buffer = None
        if method == "full_update_drop_reference":
            os.environ["HF_DROPGRAD_BACKEND"] = "torch"  # masked_select, with its reused mask
            buffer = torch.empty(numel, dtype=torch.bool)

        def call() -> None:
            functional.save_dropped(g, 12345, threshold, buffer).restore(buffer)
    elif method == "full_update_drop_step":
        # what a DropGrad step with full update drop runs: mask the gradient and pack the
        # parameter's dropped values in one pass (hf_dropgrad::mask_gather_dropped_), restore
        from hf_dropgrad import functional

        param = torch.empty(numel, dtype=dtype).normal_()

        def call() -> None:
            saved = functional.mask_and_save_dropped_many(
                [g], [param], [12345], [threshold], [scale]
            )
            saved.restore()
    elif method == "naive":  # PyPI dropgrad 0.1.0

        def call() -> None:
            g.mul_(torch.bernoulli(torch.full_like(g, 0.9))).div_(0.9)
    else:
        raise ValueError(method)
    call()  # warm-up: thread pool, lazy initialisation, the kernel build
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        how = "VmHWM reset via /proc/self/clear_refs"
    except OSError:
        how = "VmHWM not resettable: lower bound"
    before = _status_kib("VmRSS")
    call()
    peak = _status_kib("VmHWM")
    extra = max(0, peak - before) * 1024
    return {"extra_bytes": extra, "bytes_per_element": extra / numel, "method": how}


def memory_section(numel: int) -> dict:
    out = {}
    for method, dtype in [
        ("kernel", "float32"),
        ("kernel", "bfloat16"),
        ("keep_mask", "float32"),
        ("reference", "float32"),
        ("full_update_drop", "float32"),
        ("full_update_drop_step", "float32"),
        ("full_update_drop_reference", "float32"),
        ("naive", "float32"),
    ]:
        cmd = [sys.executable, "-m", "benchmarks.bench_overhead", "--memory-probe", method,
               str(numel), dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
        key = f"{method} {dtype}"
        if proc.returncode != 0:
            out[key] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            out[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- main
def _print_table(title: str, rows: dict[str, dict], ratio_name: str) -> None:
    print(f"\n{title}")
    print(f"  {'':40s} {'median ms':>10s} {'min ms':>9s} {ratio_name:>12s}")
    for name, row in rows.items():
        ratio = f"{row['overhead_x']:.3f}x" if "overhead_x" in row else "1 (ref)"
        print(f"  {name:40s} {row['median_ms']:10.1f} {row['min_ms']:9.1f} {ratio:>12s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats (15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds (3)")
    parser.add_argument("--p", type=float, default=0.1, help="drop rate of the kernel run")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--sections",
        default="kernel,dropgrad,memory",
        help="comma-separated subset of kernel,dropgrad,memory (all three by default)",
    )
    parser.add_argument("--reference", action="store_true", help="also time the pure-torch path")
    parser.add_argument(
        "--rates", default="0.1,0.5", help="drop rates of the DropGrad section (0.1,0.5)"
    )
    parser.add_argument(
        "--dtypes", default="float32,bfloat16",
        help="parameter dtypes of the DropGrad section (float32,bfloat16)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall (default) or cpu: process CPU time, robust to other processes' load when "
        "used with --threads 1",
    )
    parser.add_argument(
        "--isa", choices=["avx512", "avx2", "portable"], default=None,
        help="the C++ kernel's code path (default: the best this CPU runs; one it cannot run "
        "falls back to the best)",
    )
    parser.add_argument("--memory-probe", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="cpu (default): the C++ kernel; cuda: the Triton backend on the GPU",
    )
    parser.add_argument(
        "--peak-gbps", type=float, default=None,
        help="--device cuda: the GPU's peak memory bandwidth in GB/s (default: from the name)",
    )
    args = parser.parse_args()
    if args.device == "cuda":
        from benchmarks import bench_cuda  # needs hf_dropgrad.DropGrad and a GPU

        result = bench_cuda.main(args, t5_small_shapes()[0])
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"\nwrote {args.json}")
        return
    global _clock
    _clock = CLOCKS[args.clock]

    torch.set_num_threads(args.threads)
    if args.memory_probe:
        method, numel, dtype = args.memory_probe
        print(json.dumps(memory_probe(method, int(numel), dtype)))
        return

    t0 = time.perf_counter()
    lib = _cpu_kernel.load()
    build_s = time.perf_counter() - t0
    if lib is None:
        sys.exit("the C++ kernel is unavailable (see the warning above)")
    if args.isa is not None:
        _cpu_kernel._set_isa(args.isa)
    shapes, source = t5_small_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    largest = max(torch.Size(s).numel() for s in shapes)
    print(
        f"t5-small parameter set ({source}): {len(shapes)} tensors, {numel / 1e6:.1f}M elements; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel path "
        f"{_cpu_kernel.isa()}, load {build_s:.1f} s; {args.clock} clock; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    result: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
            "kernel_isa": _cpu_kernel.isa(),
        },
        "params": {"tensors": len(shapes), "numel": numel, "largest": largest, "shapes": source},
        "repeats": args.repeats,
        "warmup": args.warmup,
    }

    sections = set(args.sections.split(","))
    if "kernel" in sections:
        params = make_params(shapes, torch.float32)
        result["kernel"] = kernel_section(params, args.p, args)
        del params
        _print_table(
            f"fp32, p={args.p}: time per call vs a bare AdamW(foreach=True) step",
            result["kernel"],
            "x AdamW",
        )

    if "dropgrad" in sections:
        wrapper = wrapper_section(shapes, args)
        result["dropgrad"] = wrapper
        if wrapper is None:
            print("\nhf_dropgrad.DropGrad not importable: wrapper timings skipped")
        else:
            for name, rows in wrapper.items():
                _print_table(f"DropGrad step vs bare AdamW step, {name}", rows, "overhead")

    if "memory" in sections and sys.platform.startswith("linux"):
        result["memory"] = memory_section(largest)
        print(f"\npeak extra resident memory of one call on the largest gradient ({largest} el.)")
        for name, row in result["memory"].items():
            if "error" in row:
                print(f"  {name:24s} error: {row['error']}")
            else:
                print(
                    f"  {name:24s} {row['bytes_per_element']:8.3f} B/element "
                    f"({row['extra_bytes'] / 2**20:.1f} MiB; {row['method']})"
                )

    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

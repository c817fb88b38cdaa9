"""GPU benchmark of the Triton backend: bandwidth, launches and host syncs per step.

Run by ``scripts/gpu_check.sh`` (``python -m benchmarks.bench_cuda``) or through
``python -m benchmarks.bench_overhead --device cuda``. For the t5-small parameter set (60.5M
elements) and a 1B-parameter set (TinyLlama-1.1B shapes; both from ``benchmarks/shapes.py``), in
fp32 and bf16, with random gradients on the GPU, it measures in one run (CUDA events, median of
``--repeats``):

* ``mask``: ``functional.mask_`` over every gradient (p = 0.1, one key per tensor), the path
  ``DropGrad.step`` takes; moves 2 x the gradient bytes (one read, one write);
* ``foreach_mul``: ``torch._foreach_mul_`` of the same gradients, the floor of one read+write
  pass (same bytes as the mask);
* ``adamw_fused``: a bare ``torch.optim.AdamW(params, fused=True).step()``; moves 7 x the
  gradient bytes (reads the gradient, reads and writes the parameter and both moments, all in
  the parameters' dtype);
* ``dropgrad`` and ``dropgrad_fud``: whole ``DropGrad(AdamW(fused=True), drop_rate=0.1)`` steps,
  without and with full update drop;
* ``copy``: a device-to-device copy of 1 GiB, the bandwidth the device reaches in practice.

Printed per set and dtype: for mask, foreach_mul and adamw_fused the device time, achieved GB/s
and its share of the device's peak memory bandwidth (``--peak-gbps`` or a table of known
devices); the mask's time against the fused AdamW step; and kernel launches and host-device
synchronisations per call / per step (launches from the torch profiler, synchronisations
counted with ``torch.cuda.set_sync_debug_mode("warn")``). Targets (docs/analysis.md): the mask
>= 70 % of peak, <= 0.25x a fused AdamW step, one launch per dtype (two when a dtype has
unaligned tensors), no synchronisation; full update drop one synchronisation per dtype.

Usage (from the repository root): ``python -m benchmarks.bench_cuda [--repeats 20] [--warmup 3]
[--p 0.1] [--peak-gbps N] [--sets t5-small,1B] [--json out.json]``. Without CUDA it exits with
a message (status 2).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.shapes import t5_small_shapes, tinyllama_shapes
from hf_dropgrad import DropGrad
from hf_dropgrad import functional as F

#: Peak DRAM bandwidth (GB/s) of common training GPUs, by a substring of the device name.
PEAK_GBPS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "GH200": 4000.0,
    "B200": 8000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10G": 600.0,
    "A10": 600.0,
    "RTX 4090": 1008.0,
    "RTX 3090": 936.0,
    "V100": 900.0,
    "T4": 320.0,
}


def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value
    return None


def cuda_time(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    """(median device ms, median host ms) per call."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    device, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end))
    return statistics.median(device), statistics.median(host)


def launches(fn: Callable[[], object]) -> dict[str, int]:
    """CUDA kernel launches of one call, by kernel name (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def synchronisations(fn: Callable[[], object]) -> int:
    """Host-device synchronisations one call of ``fn`` makes (torch's sync debug mode)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def kernel_launches(fn: Callable[[], object]) -> tuple[int, int]:
    """(kernel launches, memory copies) of one call of ``fn``."""
    events = launches(fn)
    copies = sum(v for k, v in events.items() if "memcpy" in k.lower() or "memset" in k.lower())
    return sum(events.values()) - copies, copies


def bench_set(
    label: str, shapes: list[tuple[int, ...]], dtype: torch.dtype, args: argparse.Namespace
) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="cuda").normal_(
            0, 0.02, generator=gen))
        p.grad = torch.empty(shape, dtype=dtype, device="cuda").normal_(0, 1e-3, generator=gen)
        params.append(p)
    grads = [p.grad for p in params]
    numel = sum(g.numel() for g in grads)
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    threshold = F.drop_threshold(args.p)
    scale = F.keep_scale(threshold)
    keys = [F.derive_key(0, 0, i) for i in range(len(grads))]
    thresholds, scales = [threshold] * len(grads), [scale] * len(grads)

    def mask() -> None:
        F.mask_(grads, keys, thresholds, scales)

    adamw = torch.optim.AdamW(params, lr=1e-6, fused=True)
    wrapped = DropGrad(torch.optim.AdamW(params, lr=1e-6, fused=True), drop_rate=args.p, seed=0)
    fud = DropGrad(torch.optim.AdamW(params, lr=1e-6, fused=True), drop_rate=args.p, seed=0,
                   full_update_drop=True)
    moved = {"mask": 2 * grad_bytes, "foreach_mul": 2 * grad_bytes, "adamw_fused": 7 * grad_bytes}
    fns = {
        "mask": mask,
        "foreach_mul": lambda: torch._foreach_mul_(grads, 1.0),
        "adamw_fused": adamw.step,
        "dropgrad": wrapped.step,
        "dropgrad_fud": fud.step,
    }
    row: dict = {"tensors": len(grads), "numel": numel, "grad_bytes": grad_bytes}
    for name, fn in fns.items():
        device_ms, host_ms = cuda_time(fn, args.warmup, args.repeats)
        row[name] = {"device_ms": device_ms, "host_ms": host_ms}
        if name in moved:
            row[name]["bytes"] = moved[name]
            row[name]["gbps"] = moved[name] / (device_ms * 1e-3) / 1e9
        row[name]["launches"], row[name]["copies"] = kernel_launches(fn)
        row[name]["synchronisations"] = synchronisations(fn)
    row["mask_vs_adamw_fused"] = row["mask"]["device_ms"] / row["adamw_fused"]["device_ms"]
    row["dropgrad_step_vs_adamw_fused"] = (
        row["dropgrad"]["device_ms"] / row["adamw_fused"]["device_ms"]
    )
    row["dropgrad_fud_step_vs_adamw_fused"] = (
        row["dropgrad_fud"]["device_ms"] / row["adamw_fused"]["device_ms"]
    )
    bare = row["adamw_fused"]["launches"]
    print(f"\n{label} {str(dtype)[6:]}: {numel / 1e6:.1f}M elements in {len(grads)} tensors")
    for name in fns:
        r = row[name]
        rate = (f"{r['gbps']:7.0f} GB/s{_pct(r['gbps'], args.peak)}" if "gbps" in r
                else f"{'':27s}")
        extra = f" (+{r['launches'] - bare} over the bare step)" if name.startswith("drop") else ""
        print(f"  {name:12s} {r['device_ms']:8.3f} ms device {r['host_ms']:7.3f} ms host  {rate}"
              f"  {r['launches']:4d} launches{extra}, {r['copies']} copies, "
              f"{r['synchronisations']} host syncs per call")
    print(f"  mask = {row['mask_vs_adamw_fused']:.3f}x fused AdamW step; DropGrad step "
          f"{row['dropgrad_step_vs_adamw_fused']:.3f}x, with full update drop "
          f"{row['dropgrad_fud_step_vs_adamw_fused']:.3f}x")
    return row


def _pct(gbps: float, peak: float | None) -> str:
    return f" ({100 * gbps / peak:5.1f} % of peak)" if peak else ""


def copy_gbps(args: argparse.Namespace) -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    device_ms, _ = cuda_time(lambda: dst.copy_(src), args.warmup, args.repeats)
    return 2 * src.numel() * 4 / (device_ms * 1e-3) / 1e9


def full_update_drop(shapes: list[tuple[int, ...]], args: argparse.Namespace) -> dict:
    """Save + restore of the dropped values on the largest tensor: time and extra bytes/element."""
    shape = max(shapes, key=lambda s: torch.Size(s).numel())
    x = torch.randn(shape, device="cuda")
    threshold = F.drop_threshold(args.p)
    device_ms, host_ms = cuda_time(
        lambda: F.save_dropped(x, 7, threshold).restore(), args.warmup, args.repeats
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    F.save_dropped(x, 7, threshold).restore()
    extra = torch.cuda.max_memory_allocated() - base
    return {
        "numel": x.numel(),
        "device_ms": device_ms,
        "host_ms": host_ms,
        "extra_bytes_per_element": extra / x.numel(),
    }


def main(args: argparse.Namespace, t5_shapes: list[tuple[int, ...]]) -> dict:
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device here (this benchmark needs a GPU)", file=sys.stderr)
        raise SystemExit(2)
    name = torch.cuda.get_device_name()
    args.peak = peak_gbps(name, getattr(args, "peak_gbps", None))
    practical = copy_gbps(args)
    print(
        f"{name}, torch {torch.__version__}; peak bandwidth "
        f"{args.peak or 'unknown (pass --peak-gbps)'} GB/s; a 1 GiB copy reaches "
        f"{practical:.0f} GB/s{_pct(practical, args.peak)}; p = {args.p}"
    )
    result: dict = {"device": name, "peak_gbps": args.peak, "copy_gbps": practical, "sets": {}}
    sets = {"t5-small": t5_shapes, "1B": tinyllama_shapes()}
    wanted = getattr(args, "sets", None) or list(sets)
    for label in wanted:
        for dtype in (torch.float32, torch.bfloat16):
            result["sets"][f"{label} {dtype}"] = bench_set(label, sets[label], dtype, args)
            torch.cuda.empty_cache()  # the set's parameters, gradients and optimizer states
    try:
        result["full_update_drop"] = fud = full_update_drop(t5_shapes, args)
    except Exception as exc:  # report, do not lose the figures above
        result["full_update_drop"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"full update drop section failed: {type(exc).__name__}: {exc}")
    else:
        print(
            f"full update drop, save + restore of {fud['numel'] / 1e6:.1f}M fp32 elements: "
            f"{fud['device_ms']:.3f} ms device, {fud['extra_bytes_per_element']:.3f} extra "
            f"B/element (the values alone: {4 * args.p:.2f})"
        )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds (3)")
    parser.add_argument("--p", type=float, default=0.1, help="drop rate (0.1)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the GPU's peak memory bandwidth in GB/s (default: from its name)")
    parser.add_argument("--sets", default="t5-small,1B",
                        help="comma-separated subset of t5-small,1B (both by default)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for s in args.sets:
        if s not in ("t5-small", "1B"):
            parser.error(f"--sets: unknown set {s!r}; allowed: t5-small, 1B")
    return args


if __name__ == "__main__":
    import json

    cli = parse_args()
    out = main(cli, t5_small_shapes()[0])
    if cli.json:
        cli.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {cli.json}")

"""GPU half of ``scripts/bench_overhead.py`` (``--device cuda``): the Triton backend on CUDA.

For the t5-small parameter set (60.5M elements) and a 1B-parameter set (TinyLlama-1.1B shapes),
in fp32 and bf16, with random gradients on the GPU, it measures in one run:

* ``mask``: ``functional.mask_`` over every gradient (p = 0.1, one key per tensor), the path
  ``DropGrad.step`` takes; device time from CUDA events, and host time per call;
* ``adamw_fused``: a bare ``torch.optim.AdamW(params, fused=True).step()`` (the reference);
* ``foreach_mul``: one read+write pass over every gradient (``torch._foreach_mul_``);
* ``dropgrad``: a whole ``DropGrad(AdamW(fused=True), drop_rate=0.1).step()``;
* ``copy``: a device-to-device copy of 1 GiB, the bandwidth the device reaches in practice.

Printed: masking time, the bytes it moves (2 x gradient bytes: one read, one write), achieved
GB/s and its share of the device's peak memory bandwidth (from ``--peak-gbps`` or a table of
known devices), the ratio to the fused AdamW step, and the kernel launches per masking call and
per DropGrad step (torch profiler). Targets: >= 70 % of peak bandwidth, <= 0.25x a fused AdamW
step, one launch for all gradients of a dtype, and no host-device synchronisation (checked with
``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

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


def tinyllama_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of TinyLlama-1.1B (22 layers, hidden 2048, GQA 4 KV heads): 1.10B."""
    d, ff, vocab, kv = 2048, 5632, 32000, 256
    layer = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [(vocab, d), *layer * 22, (d,), (vocab, d)]


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


def synchronises(fn: Callable[[], object]) -> str | None:
    """``None`` if ``fn`` makes no host-device synchronisation, else what torch reported."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


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
    moved = 2 * sum(g.numel() * g.element_size() for g in grads)
    threshold = F.drop_threshold(args.p)
    scale = F.keep_scale(threshold)
    keys = [F.derive_key(0, 0, i) for i in range(len(grads))]
    thresholds, scales = [threshold] * len(grads), [scale] * len(grads)

    def mask() -> None:
        F.mask_(grads, keys, thresholds, scales)

    adamw = torch.optim.AdamW(params, lr=1e-6, fused=True)
    wrapped = DropGrad(torch.optim.AdamW(params, lr=1e-6, fused=True), drop_rate=args.p, seed=0)
    fns = {
        "mask": mask,
        "adamw_fused": adamw.step,
        "foreach_mul": lambda: torch._foreach_mul_(grads, 1.0),
        "dropgrad": wrapped.step,
    }
    row: dict = {"tensors": len(grads), "numel": numel, "bytes_moved_by_mask": moved}
    for name, fn in fns.items():
        device_ms, host_ms = cuda_time(fn, args.warmup, args.repeats)
        row[name] = {"device_ms": device_ms, "host_ms": host_ms}
    row["mask_synchronises"] = synchronises(mask)
    row["dropgrad_step_synchronises"] = synchronises(wrapped.step)
    mask_events = launches(mask)
    row["mask_launches"] = sum(v for k, v in mask_events.items() if "memcpy" not in k.lower())
    row["mask_copies"] = sum(v for k, v in mask_events.items() if "memcpy" in k.lower())
    step_kernels = launches(wrapped.step)
    bare_kernels = launches(adamw.step)
    row["dropgrad_extra_launches"] = sum(step_kernels.values()) - sum(bare_kernels.values())
    mask_ms = row["mask"]["device_ms"]
    row["mask_gbps"] = moved / (mask_ms * 1e-3) / 1e9
    row["mask_vs_adamw_fused"] = mask_ms / row["adamw_fused"]["device_ms"]
    row["dropgrad_step_vs_adamw_fused"] = (
        row["dropgrad"]["device_ms"] / row["adamw_fused"]["device_ms"]
    )
    print(
        f"{label:9s} {str(dtype)[6:]:8s} {numel / 1e6:7.1f}M {len(grads):4d} tensors | mask "
        f"{mask_ms:7.3f} ms device, {row['mask']['host_ms']:7.3f} ms host, "
        f"{row['mask_gbps']:7.0f} GB/s{_pct(row['mask_gbps'], args.peak)} | "
        f"{row['mask_vs_adamw_fused']:.3f}x fused AdamW ({row['adamw_fused']['device_ms']:.3f} ms)"
        f" | DropGrad step {row['dropgrad_step_vs_adamw_fused']:.3f}x | launches "
        f"{row['mask_launches']} kernel(s) + {row['mask_copies']} copy per mask_, "
        f"+{row['dropgrad_extra_launches']} per step | "
        f"syncs: mask_ {row['mask_synchronises'] or 'none'}, "
        f"step {row['dropgrad_step_synchronises'] or 'none'}"
    )
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
        raise SystemExit("--device cuda: no CUDA device here")
    name = torch.cuda.get_device_name()
    args.peak = peak_gbps(name, args.peak_gbps)
    practical = copy_gbps(args)
    print(
        f"{name}, torch {torch.__version__}; peak bandwidth "
        f"{args.peak or 'unknown (pass --peak-gbps)'} GB/s; a 1 GiB copy reaches "
        f"{practical:.0f} GB/s{_pct(practical, args.peak)}; p = {args.p}"
    )
    result: dict = {"device": name, "peak_gbps": args.peak, "copy_gbps": practical, "sets": {}}
    sets = {"t5-small": t5_shapes, "1B": tinyllama_shapes()}
    for label, shapes in sets.items():
        for dtype in (torch.float32, torch.bfloat16):
            result["sets"][f"{label} {dtype}"] = bench_set(label, shapes, dtype, args)
            torch.cuda.empty_cache()  # the set's parameters, gradients and optimizer states
    result["full_update_drop"] = fud = full_update_drop(t5_shapes, args)
    print(
        f"full update drop, save + restore of {fud['numel'] / 1e6:.1f}M fp32 elements: "
        f"{fud['device_ms']:.3f} ms device, {fud['extra_bytes_per_element']:.3f} extra "
        f"B/element (the values alone: {4 * args.p:.2f})"
    )
    return result

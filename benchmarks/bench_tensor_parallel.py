"""Masking a tensor-parallel column shard against masking a contiguous shard of the same size.

A ``RowwiseParallel`` weight is placed ``Shard(1)``: each process holds a block of columns, a
run per row in the full weight (docs/design.md, "Where the elements sit"). DropGrad masks it in
one kernel call, reading the stream run by run; a run shorter than a 4096-element chunk still
pays for the hashes of the lanes it covers, which a contiguous shard shares between its
elements. This measures what that costs on CPU, in one run and interleaved repeat by repeat
(``benchmarks/bench_overhead.py``'s timing), for one half of a ``4096 x 4096`` weight (and a
quarter, with ``--parts 4``):

* ``contiguous``: ``Shard(0)``'s half, 2048 x 4096 rows, one run (``ops.mask_`` with its offset);
* ``column``: ``Shard(1)``'s half, 4096 rows of 2048 columns (``runs=2048, strides=4096``);
* ``column, odd width``: the same with rows of 2047 columns of a ``4096 x 4094`` weight
  (runs that start at every phase of a chunk).

The ratio is column / contiguous (median times); the target is at most 1.5 for the half. On a
GPU the Triton backend makes one launch per dtype (two with unaligned runs) whatever the runs
(``tests/test_kernels_triton.py``), and its kernels' compiled code does not change
(``scripts/inspect_kernels.py``).

Usage (from the repository root): ``python -m benchmarks.bench_tensor_parallel [--threads 2]
[--repeats 30] [--parts 2] [--clock wall|cpu] [--json out.json]``; on a machine shared with
other jobs, ``--threads 1 --clock cpu`` gives load-robust per-core ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from benchmarks import bench_overhead
from benchmarks.bench_overhead import CLOCKS, summarize, time_interleaved
from hf_dropgrad.kernels import cpp, ops

THRESHOLD = 6554  # p = 0.1
SCALE = 65536 / (65536 - THRESHOLD)


def cases(rows: int, cols: int, parts: int, dtype: torch.dtype) -> dict[str, object]:
    """The three shards of one ``rows x cols`` weight cut in ``parts``, and their mask calls."""
    width = cols // parts
    contiguous = torch.randn(rows // parts * cols).to(dtype)
    column = torch.randn(rows, width).to(dtype)
    odd_cols = cols - 2
    odd = torch.randn(rows, odd_cols // parts).to(dtype)
    first = width  # the second part: a shard that does not start at column 0
    return {
        "contiguous": lambda: ops.mask_([contiguous], [7], [THRESHOLD], [SCALE],
                                        [rows // parts * cols]),
        "column": lambda: ops.mask_([column], [7], [THRESHOLD], [SCALE], [first], [width],
                                    [cols]),
        "column, odd width": lambda: ops.mask_([odd], [7], [THRESHOLD], [SCALE],
                                               [odd_cols // parts], [odd_cols // parts],
                                               [odd_cols]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--parts", type=int, default=2, help="tensor-parallel size")
    parser.add_argument("--size", type=int, default=4096, help="rows and columns of the weight")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: process time, robust to other load at --threads 1")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    bench_overhead._clock = CLOCKS[args.clock]
    if cpp.load() is None:
        raise SystemExit(f"the C++ kernel is unavailable: {cpp.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"kernel {cpp.isa()}, {args.clock} clock, load average {os.getloadavg()[0]:.2f}; "
          f"a {args.size} x {args.size} weight in {args.parts} parts, p = 0.1")
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        samples = time_interleaved(cases(args.size, args.size, args.parts, dtype), args.warmup,
                                   args.repeats)
        rows = summarize(samples, "contiguous", extra=False)
        name = str(dtype).removeprefix("torch.")
        results[name] = rows
        print(f"{name}:")
        for case, row in rows.items():
            ratio = f"{row['overhead_x']:.3f}x" if "overhead_x" in row else "1 (reference)"
            print(f"  {case:20s} median {row['median_ms']:7.2f} ms  min {row['min_ms']:7.2f} ms"
                  f"  {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "clock": args.clock, "parts": args.parts,
                       "size": args.size,
                       "isa": cpp.isa(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

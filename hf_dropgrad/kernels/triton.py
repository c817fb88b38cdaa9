"""The ``triton`` backend: the stream, compare and scale fused in one pass on CUDA.

Layout of the work (docs/design.md, "The GPU kernels"). One program handles one stream chunk
(4096 elements) of one tensor. It hashes the chunk's 1024 counters once (SplitMix64 in
``uint64``, eight per thread), then walks the chunk's four lanes, each 1024 consecutive elements
of the tensor: load, compare the lane's 16 bits with the threshold, scale, store. Each gradient
is read once and written once, with no temporaries.

All the gradients of a call that share a device and dtype go in one launch per *path*:

* the **aligned** path takes tensors whose data pointer, global offset and length are multiples
  of 16 bytes (every weight in practice). ``tl.multiple_of`` hints let the compiler prove that
  each lane's run of elements is 16-byte aligned, so gradients move with 128-bit loads and
  stores (``LDG.E.128`` / ``STG.E.128``);
* the **generic** path takes everything else (odd sizes, offsets, pointers of views) with
  element-wise loads and stores, exact for any layout.

So a call makes one launch per dtype, or two when a dtype has tensors of both kinds.

A program finds its tensor with two dependent loads and no search: the host builds a
*program map* (three int32 per program: the row of the program's tensor in the table, the run of
the tensor the program works in, and the program's chunk within that run), and the program
reads its entry, then its tensor's row of the table (data pointer, run length, offset, key, run
stride, threshold, scale). A tensor in several runs (a column shard under tensor parallel, see
:mod:`hf_dropgrad.kernels.checks`) costs nothing more per program than a contiguous one: the
run's stream offset and data pointer are two multiply-adds. The table and the map travel to the
device in two asynchronous copies from pinned memory, so there is no host-device
synchronisation; the map only depends on the tensors' sizes, offsets and runs and is cached,
pinned, on the host. In-chunk indices
are int32 (the chunk's base pointer carries the 64-bit part), which keeps every masking variant
well under 64 registers per thread (``scripts/inspect_kernels.py`` prints the compiled
figures). The bits equal the C++ kernel's and the reference's (bfloat16 is rounded in the kernel
by c10's rule, canonical NaN included; float16 NaNs may differ from the C++ kernel's in payload
only).

Full update drop (:func:`gather_dropped_many`, :func:`scatter_dropped_many`) works on a whole
list of tensors with a fixed number of launches: a counting kernel writes the number of dropped
elements of every chunk of every tensor, ``torch.cumsum`` turns the counts into offsets on the
device, and a moving kernel writes (or reads back) each chunk's dropped values at its offset, in
stream order. Sizing the values tensor reads the total back to the host: one synchronisation per
call, whatever the number of tensors. Memory: the values (``p`` times the tensors' bytes) plus
8 bytes of offsets and 12 bytes of program map per chunk.

Every kernel variant the backend launches is listed in :data:`VARIANTS` with its compile
signature, and launches go through it, so ``scripts/inspect_kernels.py`` compiles exactly what
runs. The kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter), which
is how the test suite checks them bit for bit on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from hf_dropgrad.kernels.checks import (
    check_lengths,
    check_offset,
    check_offsets,
    check_pairs,
    check_runs,
    check_threshold,
)
from hf_dropgrad.kernels.stream import CHUNK, signed64

__all__ = [
    "DTYPES",
    "VARIANTS",
    "Variant",
    "gather_dropped_at",
    "gather_dropped_many",
    "interpreting",
    "keep_mask_",
    "mask_",
    "mask_counted_",
    "mask_gather_dropped_",
    "scatter_dropped_many",
]

#: Gradient dtypes :func:`mask_` takes, and their code (``KIND``) in :func:`_mask_kernel`.
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DTYPES = tuple(_KINDS)
_ONE_BITS = array("I", array("f", [1.0]).tobytes())[0]
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: Bytes a 128-bit load or store moves; the aligned path needs pointer, offset and size to be
#: multiples of it.
_VECTOR_BYTES = 16
#: Warps per program of the masking kernels: 128 threads, eight counters (and 4 x 8 elements)
#: per thread, so a bfloat16 lane moves in one 128-bit access per thread.
_NUM_WARPS = 4
#: Warps per program of full update drop's kernels: their in-lane prefix sums need more
#: registers per element; 8 warps keep them at 64 registers or fewer.
_PACK_WARPS = 8


# Triton reads TRITON_INTERPRET when it decorates a kernel, i.e. when this module is imported.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")


def interpreting() -> bool:
    """Whether this module's kernels run in Triton's interpreter, which takes CPU tensors.

    Fixed when the module is imported: set ``TRITON_INTERPRET=1`` before that.
    """
    return _INTERPRETING


# ----------------------------------------------------------------------------------- kernels
# Every runtime argument is left unspecialised (no "divisible by 16" or "equals 1" variants), so
# a kernel compiles to exactly one binary per entry of VARIANTS, the one inspect_kernels.py reads.
def _jit(*params: str):
    return triton.jit(do_not_specialize=list(params), do_not_specialize_on_alignment=list(params))


# A row of the table the kernels read is 8 int64: data pointer, run length, offset, key (int64
# bits), run stride, threshold, scale (float32 bits), unused. A program's entry of the program
# map is 3 int32: its table row, its run, its chunk within the run.


@triton.jit
def _hashes(key, chunk):
    """The 1024 SplitMix64 outputs (``uint64``) of stream chunk ``chunk`` of ``key``."""
    b = tl.arange(0, 1024)
    z = chunk.to(tl.uint64) * 1024 + (b + 1).to(tl.uint64)
    z = key + z * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _locate(table, progmap, V: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tensor and chunk: two dependent loads (map entry, then the table row).

    Returns the row, the chunk (global index), ``start`` (the index, within the program's run,
    of the chunk's first stream element: int64, negative when the run starts inside the chunk),
    the in-chunk bounds ``[lo, hi)`` of the run (int32), the key, and the local index of the
    run's first element. On the aligned path the run length, offset and stride, and so
    ``start``, ``lo``, ``hi`` and the run's first element, are multiples of ``V`` elements
    (16 bytes).
    """
    entry = progmap + tl.program_id(0).to(tl.int64) * 3
    row = table + tl.load(entry).to(tl.int64) * 8  # 8 words per row
    r = tl.load(entry + 1).to(tl.int64)
    k = tl.load(entry + 2).to(tl.int64)
    run = tl.load(row + 1)
    offset = tl.load(row + 2)
    key = tl.load(row + 3).to(tl.uint64)
    stride = tl.load(row + 4)
    if ALIGNED:
        run = tl.multiple_of(run, V)
        offset = tl.multiple_of(offset, V)
        stride = tl.multiple_of(stride, V)
    at = offset + r * stride  # the run's first stream element
    chunk = at // 4096 + k
    start = chunk * 4096 - at
    lo = tl.maximum(-start, 0).to(tl.int32)
    hi = tl.minimum(run - start, 4096).to(tl.int32)
    first = r * run
    if ALIGNED:
        lo = tl.multiple_of(lo, V)
        hi = tl.multiple_of(hi, V)
        first = tl.multiple_of(first, V)
    return row, chunk, start + first, lo, hi, key


@triton.jit
def _lane(j: tl.constexpr, ALIGNED: tl.constexpr):
    """In-chunk indices (int32) of lane ``j``: 1024 consecutive elements."""
    local = j * 1024 + tl.arange(0, 1024)
    if ALIGNED:
        local = tl.max_contiguous(tl.multiple_of(local, 1024), 1024)
    return local


@triton.jit
def _base(row, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer (``DTYPE``) to the tensor element at the chunk's first stream position."""
    base = tl.load(row).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    return base + start


@_jit("table", "progmap")
def _mask_kernel(table, progmap, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Mask one stream chunk of one tensor of a whole list (one launch per dtype and path).

    KIND: 0 float32, 1 bfloat16 (moved as int16 bits), 2 float16. ALIGNED: the tensors' pointer,
    offset and size are multiples of 16 bytes (128-bit loads and stores).
    """
    if KIND == 0:
        V: tl.constexpr = 4
        DTYPE: tl.constexpr = tl.float32
    elif KIND == 1:
        V: tl.constexpr = 8
        DTYPE: tl.constexpr = tl.int16
    else:
        V: tl.constexpr = 8
        DTYPE: tl.constexpr = tl.float16
    row, chunk, start, lo, hi, key = _locate(table, progmap, V, ALIGNED)
    threshold = tl.load(row + 5).to(tl.int32)
    scale = tl.load(row + 6).to(tl.int32).to(tl.float32, bitcast=True)
    z = _hashes(key, chunk)
    base = _base(row, start, DTYPE, ALIGNED)
    for j in tl.static_range(4):
        local = _lane(j, ALIGNED)
        valid = (local >= lo) & (local < hi)
        keep = ((z >> (16 * j)) & 0xFFFF).to(tl.int32) >= threshold
        factor = tl.where(keep, scale, 0.0)
        ptr = base + local
        # Masked-off lanes are neither loaded nor stored: no `other` value is needed.
        if KIND == 1:
            # bfloat16 travels as int16 bits and is rounded here exactly as c10::BFloat16(float)
            # (round to nearest even, NaN -> 0x7FC0), the C++ kernel's rule, on every platform.
            raw = tl.load(ptr, mask=valid).to(tl.uint16).to(tl.uint32)
            v = (raw << 16).to(tl.float32, bitcast=True) * factor
            u = v.to(tl.uint32, bitcast=True)
            r = tl.where(v != v, 0x7FC0, (u + ((u >> 16) & 1) + 0x7FFF) >> 16)
            tl.store(ptr, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
        elif KIND == 2:
            g = tl.load(ptr, mask=valid)
            tl.store(ptr, (g.to(tl.float32) * factor).to(tl.float16), mask=valid)
        else:
            g = tl.load(ptr, mask=valid)
            tl.store(ptr, g * factor, mask=valid)


@_jit("table", "progmap", "counts")
def _count_kernel(table, progmap, counts):
    """``counts[pid + 1]``: the number of dropped elements of this program's chunk (int64);
    program 0 also writes ``counts[0] = 0``, so ``cumsum(counts)`` is every chunk's start."""
    row, chunk, _start, lo, hi, key = _locate(table, progmap, 1, False)
    threshold = tl.load(row + 5).to(tl.int32)
    z = _hashes(key, chunk)
    # Counted per thread across the four lanes, then reduced once: four reductions of i1
    # vectors made the compiler pack partial sums as bytes through an 8-byte stack frame.
    dropped = tl.zeros([1024], dtype=tl.int32)
    for j in tl.static_range(4):
        local = _lane(j, False)
        bits = ((z >> (16 * j)) & 0xFFFF).to(tl.int32)
        dropped += tl.where((bits < threshold) & (local >= lo) & (local < hi), 1, 0)
    total = tl.sum(dropped, axis=0)
    pid = tl.program_id(0)
    tl.store(counts + pid + 1, total.to(tl.int64))
    if pid == 0:
        tl.store(counts, total.to(tl.int64) * 0)


@_jit("table", "progmap", "values", "starts", "nvalues")
def _move_kernel(table, progmap, values, starts, nvalues, DTYPE: tl.constexpr,
                 GATHER: tl.constexpr):
    """Copy this chunk's dropped elements to (GATHER) or from ``values`` at ``starts[pid]``.

    Elements move as raw bits (``DTYPE`` an int type of the element size). Within a chunk the
    stream order is lane after lane, each lane in element order: an in-lane prefix sum gives
    each dropped element its slot. Slots at or past ``nvalues`` (the values tensor's length)
    are never touched, whatever ``starts`` says.
    """
    row, chunk, start, lo, hi, key = _locate(table, progmap, 1, False)
    threshold = tl.load(row + 5).to(tl.int32)
    z = _hashes(key, chunk)
    base = _base(row, start, DTYPE, False)
    slot0 = tl.load(starts + tl.program_id(0))
    for j in tl.static_range(4):
        local = _lane(j, False)
        dropped = (((z >> (16 * j)) & 0xFFFF).to(tl.int32) < threshold) & (local >= lo) & (
            local < hi
        )
        d = dropped.to(tl.int32)
        slot = slot0 + (tl.cumsum(d, axis=0) - d).to(tl.int64)
        moved = dropped & (slot < nvalues)
        if GATHER:
            tl.store(values + slot, tl.load(base + local, mask=moved), mask=moved)
        else:
            tl.store(base + local, tl.load(values + slot, mask=moved), mask=moved)
        slot0 += tl.sum(d, axis=0).to(tl.int64)


# ---------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: what :func:`_launch` runs and inspect_kernels.py compiles.

    ``signature`` maps each runtime argument to its Triton type, in launch order; ``constexprs``
    fixes the compile-time arguments.
    """

    name: str
    kernel: Any
    role: str
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    aligned: bool | None = None
    num_warps: int = _NUM_WARPS


_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_MOVE_DTYPES = {
    1: (tl.int8, "i8"), 2: (tl.int16, "i16"), 4: (tl.int32, "i32"), 8: (tl.int64, "i64")
}


def _all_variants() -> dict[str, Variant]:
    found: list[Variant] = []
    for dtype, kind in _KINDS.items():
        for aligned in (True, False):
            found.append(Variant(
                f"mask_{_DTYPE_NAME[dtype]}_{'aligned' if aligned else 'generic'}", _mask_kernel,
                "mask", {"table": "*i64", "progmap": "*i32"},
                {"KIND": kind, "ALIGNED": aligned}, dtype, aligned,
            ))
    found.append(Variant("count", _count_kernel, "count",
                         {"table": "*i64", "progmap": "*i32", "counts": "*i64"},
                         num_warps=_PACK_WARPS))
    for size, (int_type, name) in _MOVE_DTYPES.items():
        for gather in (True, False):
            role = "gather" if gather else "scatter"
            found.append(Variant(
                f"{role}_{8 * size}bit", _move_kernel, role,
                {"table": "*i64", "progmap": "*i32", "values": f"*{name}", "starts": "*i64",
                 "nvalues": "i64"},
                {"DTYPE": int_type, "GATHER": gather}, num_warps=_PACK_WARPS,
            ))
    return {v.name: v for v in found}


#: Every kernel variant the backend can launch, by name.
VARIANTS: dict[str, Variant] = _all_variants()


def _launch(name: str, programs: int, *args: Any) -> None:
    """Launch variant ``name`` over ``programs`` programs; the one place kernels are launched."""
    variant = VARIANTS[name]
    variant.kernel[(programs,)](*args, **variant.constexprs, num_warps=variant.num_warps)


# ------------------------------------------------------------------------------------ host side
def _check_device(tensor: torch.Tensor, name: str) -> None:
    if tensor.device.type != "cuda" and not (tensor.device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{name} must be a CUDA tensor for the triton backend (CPU tensors only under "
            f"TRITON_INTERPRET=1), got one on {tensor.device}"
        )


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


#: ``(numel, offset, run, stride)`` of each tensor of a launch, in table order.
_Layout = tuple[tuple[int, int, int, int], ...]


@functools.lru_cache(maxsize=64)
def _program_map(layout: _Layout, pinned: bool) -> torch.Tensor:
    """The program map (CPU, int32, 3 per program) of tensors laid out as ``layout``: for each
    tensor, each run, each chunk of the run, ``(tensor row, run, chunk within the run)``.

    Built in plain Python (no torch work on the host, whatever the layout), cached (it depends
    only on the layout, the same at every step) and never written to; in pinned memory for
    CUDA, so copies from it are asynchronous and need no staging.
    """
    out = array("i")
    for row, (numel, offset, run, stride) in enumerate(layout):
        for r in range(numel // run if numel else 0):
            at = offset + r * stride
            for k in range((at + run - 1) // CHUNK - at // CHUNK + 1):
                out.extend((row, r, k))
    progmap = torch.frombuffer(out, dtype=torch.int32) if out else torch.empty(0, dtype=torch.int32)
    return progmap.pin_memory() if pinned else progmap


def _upload(table: array, layout: _Layout, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(table as int64, program map as int32, programs) on ``device``, copied without blocking
    the host.

    On CUDA both copies read pinned memory: the table is staged in torch's caching host
    allocator (its block is reused only once the copy has run), the map is cached pinned.
    """
    rows = torch.frombuffer(table, dtype=torch.int64)  # holds a reference to the array
    progmap = _program_map(layout, device.type == "cuda")
    programs = progmap.numel() // 3
    if device.type != "cuda":
        return rows, progmap, programs
    return (rows.pin_memory().to(device, non_blocking=True),
            progmap.to(device, non_blocking=True), programs)


class _Call:
    """A call's tensors, checked, with their places: what the launches read."""

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        keys: Sequence[int],
        thresholds: Sequence[int],
        offsets: Sequence[int] | None,
        runs: Sequence[int] | None,
        strides: Sequence[int] | None,
    ) -> None:
        n = len(tensors)
        if not len(keys) == len(thresholds) == n:
            raise ValueError(
                f"tensors, keys and thresholds differ in length: {n}, {len(keys)}, "
                f"{len(thresholds)}"
            )
        self.tensors = list(tensors)
        self.offsets = check_offsets(offsets, n)
        self.runs, self.strides = check_runs(
            [t.numel() for t in tensors], self.offsets, runs, strides
        )
        self.keys = [signed64(int(k)) for k in keys]
        self.thresholds = [check_threshold(t, f"thresholds[{i}]")
                           for i, t in enumerate(thresholds)]

    def aligned(self, i: int) -> bool:
        """Whether tensor ``i``'s pointer, runs and run starts are multiples of 16 bytes."""
        t, size = self.tensors[i], self.tensors[i].element_size()
        return (
            t.data_ptr() % _VECTOR_BYTES == 0
            and self.offsets[i] * size % _VECTOR_BYTES == 0
            and self.runs[i] * size % _VECTOR_BYTES == 0
            and (self.runs[i] == t.numel() or self.strides[i] * size % _VECTOR_BYTES == 0)
        )

    def table(self, index: Sequence[int], scale_bits: Sequence[int] | None = None
              ) -> tuple[array, _Layout]:
        """The table rows and the layout of the tensors ``index``, in that order."""
        table = array("q")
        layout = []
        for i in index:
            t = self.tensors[i]
            table.extend((t.data_ptr(), self.runs[i], self.offsets[i], self.keys[i],
                          self.strides[i], self.thresholds[i],
                          0 if scale_bits is None else scale_bits[i], 0))
            layout.append((t.numel(), self.offsets[i], self.runs[i], self.strides[i]))
        return table, tuple(layout)


def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> None:
    """Mask every gradient in place: per device and dtype, one launch per path (at most two).

    A table of the tensors and the program map go to the device in two asynchronous copies from
    pinned memory; every program of a launch masks one stream chunk of one run of one tensor.
    Tensors whose pointer, offset, runs and run stride are multiples of 16 bytes take the
    aligned (128-bit) kernel, the others the generic one. Arguments as in
    :class:`hf_dropgrad.kernels.protocol.Backend`: contiguous CUDA tensors (CPU under
    ``TRITON_INTERPRET=1``), float32, bfloat16 or float16, not overlapping one another.
    """
    check_lengths(grads, keys, thresholds, scales)
    call = _Call(grads, keys, thresholds, offsets, runs, strides)
    scale_bits = array("I", array("f", [float(x) for x in scales]).tobytes())
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[int]]] = {}
    for i, g in enumerate(grads):
        _check_device(g, f"grads[{i}]")
        if g.dtype not in _KINDS or g.layout is not torch.strided or not g.is_contiguous():
            raise ValueError(
                f"grads[{i}] must be a contiguous dense float32/bfloat16/float16 tensor, got "
                f"{g.dtype} {g.layout}{'' if g.is_contiguous() else ' (not contiguous)'}"
            )
        if g.numel() and not (call.thresholds[i] == 0 and scale_bits[i] == _ONE_BITS):
            paths = groups.setdefault((g.device, g.dtype), ([], []))
            paths[0 if call.aligned(i) else 1].append(i)
    for (device, dtype), (aligned, generic) in groups.items():
        table, layout = call.table(aligned + generic, scale_bits)
        table_d, progmap, programs = _upload(table, layout, device)
        # The aligned tensors' programs come first in the map (a prefix of the same layout).
        split = _program_map(layout[: len(aligned)], False).numel() // 3
        name = f"mask_{_DTYPE_NAME[dtype]}_"
        with _on_device(device):
            if aligned:
                _launch(name + "aligned", split, table_d, progmap)
            if generic:
                _launch(name + "generic", programs - split, table_d, progmap[3 * split:])


def _check_pack(call: _Call) -> None:
    if not call.tensors:
        raise ValueError("tensors must hold at least one tensor")
    first = call.tensors[0]
    for i, t in enumerate(call.tensors):
        _check_device(t, f"tensors[{i}]")
        if (
            t.layout is not torch.strided
            or not t.is_contiguous()
            or t.element_size() not in _INT_OF_SIZE
        ):
            raise ValueError(
                f"tensors[{i}] must be a contiguous dense tensor with 1-, 2-, 4- or 8-byte "
                f"elements, got {t.dtype} {t.layout}"
            )
        if t.device != first.device or t.element_size() != first.element_size():
            raise ValueError(
                f"tensors must share one device and element size: tensors[0] is {first.dtype} on "
                f"{first.device}, tensors[{i}] {t.dtype} on {t.device}"
            )


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    # Values are moved as raw bits: any dtype of a supported size, NaN payloads included.
    return tensor.view(-1).view(_INT_OF_SIZE[tensor.element_size()])


def _counts(call: _Call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(starts, table, progmap, programs)`` of a pack call: the count launch and its cumsum."""
    device = call.tensors[0].device
    table, layout = call.table(range(len(call.tensors)))
    table_d, progmap, programs = _upload(table, layout, device)
    with _on_device(device):
        if programs == 0:
            return torch.zeros(1, dtype=torch.int64, device=device), table_d, progmap, 0
        counts = torch.empty(programs + 1, dtype=torch.int64, device=device)
        _launch("count", programs, table_d, progmap, counts)
        return torch.cumsum(counts, 0), table_d, progmap, programs


def gather_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropped elements of every tensor, packed in stream order, and each chunk's start.

    Returns ``(values, starts)`` as :class:`hf_dropgrad.kernels.protocol.Backend` says: one
    element size for all the tensors (1, 2, 4 or 8 bytes; moved as raw bits), on one CUDA
    device (CPU under ``TRITON_INTERPRET=1``). Launches: two copies, a count, a cumsum and a
    gather, whatever the number of tensors; one host read-back (the total, to size
    ``values``).
    """
    call = _Call(tensors, keys, thresholds, offsets, runs, strides)
    _check_pack(call)
    device, dtype = call.tensors[0].device, call.tensors[0].dtype
    starts, table_d, progmap, programs = _counts(call)
    with _on_device(device):
        total = int(starts[-1])  # sizing the output: the one host-device synchronisation
        values = torch.empty(total, dtype=dtype, device=device)
        if total:
            _launch(f"gather_{8 * values.element_size()}bit", programs, table_d, progmap,
                    _raw(values), starts, total)
    return values, starts


def _check_starts(starts: torch.Tensor, programs: int, device: torch.device) -> None:
    if starts.dtype != torch.int64 or starts.numel() != programs + 1 or starts.device != device:
        raise ValueError(f"starts must be an int64 tensor of {programs + 1} elements on {device}")


def _check_values(values: torch.Tensor, call: _Call) -> None:
    first = call.tensors[0]
    if (values.element_size() != first.element_size() or values.device != first.device
            or not values.is_contiguous()):
        raise ValueError(
            f"values must be a contiguous tensor of {first.dtype}'s element size on "
            f"{first.device}, got {values.dtype} on {values.device}"
        )


def scatter_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
    values: torch.Tensor,
    starts: torch.Tensor,
) -> None:
    """Write ``values`` back into the dropped elements of every tensor; kept ones stay.

    ``values`` and ``starts`` come from :func:`gather_dropped_many` with the same arguments.
    Two copies and one launch, no host read-back: the kernel never reads past the end of
    ``values``, whatever ``starts`` says (the callers that do not hold values made by
    :func:`gather_dropped_many` check ``starts[-1]`` against them on the host).
    """
    call = _Call(tensors, keys, thresholds, offsets, runs, strides)
    _check_pack(call)
    device = call.tensors[0].device
    table, layout = call.table(range(len(call.tensors)))
    table_d, progmap, programs = _upload(table, layout, device)
    _check_starts(starts, programs, device)
    _check_values(values, call)
    if programs == 0 or values.numel() == 0:
        return
    with _on_device(device):
        _launch(f"scatter_{8 * values.element_size()}bit", programs, table_d, progmap,
                _raw(values), starts, values.numel())


def mask_counted_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
    starts: torch.Tensor,
) -> None:
    """:func:`mask_`, and ``starts`` filled by the count kernel (a launch of its own: the mask
    kernel does not count)."""
    call = _Call(grads, keys, thresholds, offsets, runs, strides)
    _check_pack(call)
    counted, _, _, programs = _counts(call)
    _check_starts(starts, programs, call.tensors[0].device)
    starts.copy_(counted)
    mask_(grads, keys, thresholds, scales, call.offsets, call.runs, call.strides)


def gather_dropped_at(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
    starts: torch.Tensor,
) -> torch.Tensor:
    """The ``values`` of :func:`gather_dropped_many`, packed at ``starts`` (no count launch; one
    host read-back, the total)."""
    call = _Call(tensors, keys, thresholds, offsets, runs, strides)
    _check_pack(call)
    device, dtype = call.tensors[0].device, call.tensors[0].dtype
    table, layout = call.table(range(len(call.tensors)))
    table_d, progmap, programs = _upload(table, layout, device)
    _check_starts(starts, programs, device)
    with _on_device(device):
        total = int(starts[-1])
        values = torch.empty(total, dtype=dtype, device=device)
        if total:
            _launch(f"gather_{8 * values.element_size()}bit", programs, table_d, progmap,
                    _raw(values), starts, total)
    return values


def mask_gather_dropped_(
    grads: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_dropped_many` of ``tensors``, then :func:`mask_` of ``grads`` (two hashing
    passes and the gather's)."""
    check_pairs(grads, tensors)
    values, starts = gather_dropped_many(tensors, keys, thresholds, offsets, runs, strides)
    mask_(grads, keys, thresholds, scales, offsets, runs, strides)
    return values, starts


def keep_mask_(out: torch.Tensor, key: int, threshold: int, offset: int) -> None:
    """Keep decisions through the mask kernel (Triton has no keep-mask kernel of its own).

    Masks a bfloat16 tensor of ones with scale 1: kept elements stay 1, dropped ones become 0
    (2 bytes per element of temporary).
    """
    _check_device(out, "out")
    ones = torch.ones(out.numel(), dtype=torch.bfloat16, device=out.device)
    if check_threshold(threshold) > 0:
        mask_([ones], [key], [threshold], [1.0], [check_offset(offset)])
    torch.ne(ones, 0, out=out.view(-1))

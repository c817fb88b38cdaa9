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
*program map* (one int32 per program: the row of the program's tensor in the table), and the
program reads its entry, then its tensor's row of the table (data pointer, size, offset, key,
first program, threshold, scale). The table and the map travel to the device in two
asynchronous copies from pinned memory, so there is no host-device synchronisation; the map only
depends on the tensors' sizes and offsets and is cached, pinned, on the host. In-chunk indices
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
8 bytes of offsets and 4 bytes of program map per 4096 elements.

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

from hf_dropgrad.kernels.checks import check_lengths, check_offset, check_offsets
from hf_dropgrad.kernels.stream import CHUNK, RESOLUTION, signed64

__all__ = [
    "DTYPES",
    "VARIANTS",
    "Variant",
    "gather_dropped",
    "gather_dropped_many",
    "interpreting",
    "mask_",
    "num_chunks",
    "scatter_dropped",
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


def num_chunks(numel: int, offset: int = 0) -> int:
    """Number of stream chunks that elements ``offset .. offset + numel - 1`` touch."""
    if numel <= 0:
        return 0
    return (offset + numel - 1) // CHUNK - offset // CHUNK + 1


# ----------------------------------------------------------------------------------- kernels
# Every runtime argument is left unspecialised (no "divisible by 16" or "equals 1" variants), so
# a kernel compiles to exactly one binary per entry of VARIANTS, the one inspect_kernels.py reads.
def _jit(*params: str):
    return triton.jit(do_not_specialize=list(params), do_not_specialize_on_alignment=list(params))


# A row of the table the kernels read is 8 int64: data pointer, numel, offset, key (int64
# bits), first program of the tensor in its launch, threshold, scale (float32 bits), unused.


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

    Returns the row, the chunk (global index), ``start`` (the tensor index of the chunk's first
    stream element, int64, negative when the tensor starts inside the chunk), the in-chunk bounds
    ``[lo, hi)`` of the tensor (int32), and the key. On the aligned path ``offset``, ``numel``
    and so ``start``, ``lo`` and ``hi`` are multiples of ``V`` elements (16 bytes).
    """
    pid = tl.program_id(0)
    row = table + tl.load(progmap + pid).to(tl.int64) * 8  # 8 words per row
    numel = tl.load(row + 1)
    offset = tl.load(row + 2)
    key = tl.load(row + 3).to(tl.uint64)
    first = tl.load(row + 4)
    if ALIGNED:
        numel = tl.multiple_of(numel, V)
        offset = tl.multiple_of(offset, V)
    chunk = pid - first + offset // 4096
    start = chunk * 4096 - offset
    lo = tl.maximum(-start, 0).to(tl.int32)
    hi = tl.minimum(numel - start, 4096).to(tl.int32)
    if ALIGNED:
        lo = tl.multiple_of(lo, V)
        hi = tl.multiple_of(hi, V)
    return row, chunk, start, lo, hi, key


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
    total = 0
    for j in tl.static_range(4):
        local = _lane(j, False)
        dropped = (((z >> (16 * j)) & 0xFFFF).to(tl.int32) < threshold) & (local >= lo) & (
            local < hi
        )
        total += tl.sum(dropped.to(tl.int32), axis=0)
    pid = tl.program_id(0)
    tl.store(counts + pid + 1, total.to(tl.int64))
    if pid == 0:
        tl.store(counts, total.to(tl.int64) * 0)


@_jit("table", "progmap", "values", "starts")
def _move_kernel(table, progmap, values, starts, DTYPE: tl.constexpr, GATHER: tl.constexpr):
    """Copy this chunk's dropped elements to (GATHER) or from ``values`` at ``starts[pid]``.

    Elements move as raw bits (``DTYPE`` an int type of the element size). Within a chunk the
    stream order is lane after lane, each lane in element order: an in-lane prefix sum gives
    each dropped element its slot.
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
        if GATHER:
            tl.store(values + slot, tl.load(base + local, mask=dropped), mask=dropped)
        else:
            tl.store(base + local, tl.load(values + slot, mask=dropped), mask=dropped)
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
                {"table": "*i64", "progmap": "*i32", "values": f"*{name}", "starts": "*i64"},
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


@functools.lru_cache(maxsize=16)
def _program_map(chunks: tuple[int, ...], pinned: bool) -> torch.Tensor:
    """The program map (CPU, int32) of tensors with these chunk counts: row ``r`` repeated.

    Cached (it depends only on the layout, the same at every step) and never written to; in
    pinned memory for CUDA, so copies from it are asynchronous and need no staging.
    """
    out = array("i")
    for r, n in enumerate(chunks):
        out.extend(array("i", [r]) * n)
    progmap = torch.frombuffer(out, dtype=torch.int32) if out else torch.empty(0, dtype=torch.int32)
    return progmap.pin_memory() if pinned else progmap


def _upload(table: array, chunks: tuple[int, ...], device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(table as int64, program map as int32) on ``device``, copied without blocking the host.

    On CUDA both copies read pinned memory: the table is staged in torch's caching host
    allocator (its block is reused only once the copy has run), the map is cached pinned.
    """
    rows = torch.frombuffer(table, dtype=torch.int64)  # holds a reference to the array
    if device.type != "cuda":
        return rows, _program_map(chunks, False)
    progmap = _program_map(chunks, True)
    return (rows.pin_memory().to(device, non_blocking=True),
            progmap.to(device, non_blocking=True))


def _is_aligned(tensor: torch.Tensor, offset: int) -> bool:
    size = tensor.element_size()
    return (
        tensor.data_ptr() % _VECTOR_BYTES == 0
        and offset * size % _VECTOR_BYTES == 0
        and tensor.numel() * size % _VECTOR_BYTES == 0
    )


def _check_threshold(threshold: int) -> int:
    t = int(threshold)
    if not 0 <= t <= RESOLUTION:
        raise ValueError(f"threshold must be in [0, {RESOLUTION}], got {t}")
    return t


def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
) -> None:
    """Mask every gradient in place: per device and dtype, one launch per path (at most two).

    A table of the tensors and the program map go to the device in two asynchronous copies from
    pinned memory; every program of a launch masks one stream chunk of one tensor. Tensors whose
    pointer, offset and size are multiples of 16 bytes take the aligned (128-bit) kernel, the
    others the generic one.

    Args:
        grads: contiguous CUDA tensors (CPU under ``TRITON_INTERPRET=1``), float32, bfloat16 or
            float16, not overlapping one another.
        keys: one stream key per tensor, an int taken modulo ``2**64``.
        thresholds: drop thresholds in ``[0, 65536]``.
        scales: factor of kept elements, rounded to float32.
        offsets: global stream index of each tensor's first element (default 0 each).
    """
    n = check_lengths(grads, keys, thresholds, scales)
    offs = check_offsets(offsets, n)
    scale_bits = array("I", array("f", [float(x) for x in scales]).tobytes())
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[int]]] = {}
    for i, g in enumerate(grads):
        _check_device(g, f"grads[{i}]")
        if g.dtype not in _KINDS or g.layout is not torch.strided or not g.is_contiguous():
            raise ValueError(
                f"grads[{i}] must be a contiguous dense float32/bfloat16/float16 tensor, got "
                f"{g.dtype} {g.layout}{'' if g.is_contiguous() else ' (not contiguous)'}"
            )
        t = _check_threshold(thresholds[i])
        if g.numel() and not (t == 0 and scale_bits[i] == _ONE_BITS):
            paths = groups.setdefault((g.device, g.dtype), ([], []))
            paths[0 if _is_aligned(g, offs[i]) else 1].append(i)
    for (device, dtype), paths in groups.items():
        table = array("q")
        chunks: list[int] = []
        for path in paths:
            first = 0
            for i in path:
                g = grads[i]
                table.extend((g.data_ptr(), g.numel(), offs[i], signed64(int(keys[i])), first,
                              int(thresholds[i]), scale_bits[i], 0))
                chunks.append(num_chunks(g.numel(), offs[i]))
                first += chunks[-1]
        table_d, progmap = _upload(table, tuple(chunks), device)
        name = f"mask_{_DTYPE_NAME[dtype]}_"
        aligned_programs = sum(chunks[: len(paths[0])])
        with _on_device(device):
            if paths[0]:
                _launch(name + "aligned", aligned_programs, table_d, progmap)
            if paths[1]:
                _launch(name + "generic", sum(chunks) - aligned_programs, table_d,
                        progmap[aligned_programs:])


def _check_pack(tensors: Sequence[torch.Tensor], keys: Sequence[int],
                thresholds: Sequence[int], offsets: Sequence[int]) -> list[int]:
    n = len(tensors)
    if n == 0:
        raise ValueError("tensors must hold at least one tensor")
    if not len(keys) == len(thresholds) == n:
        raise ValueError(
            f"tensors, keys and thresholds differ in length: {n}, {len(keys)}, {len(thresholds)}"
        )
    offs = check_offsets(offsets, n)
    first = tensors[0]
    for i, t in enumerate(tensors):
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
        _check_threshold(thresholds[i])
    return offs


def _pack_table(tensors: Sequence[torch.Tensor], keys: Sequence[int],
                thresholds: Sequence[int], offs: list[int]) -> tuple[array, tuple[int, ...]]:
    table = array("q")
    chunks: list[int] = []
    first = 0
    for t, key, threshold, off in zip(tensors, keys, thresholds, offs):
        table.extend((t.data_ptr(), t.numel(), off, signed64(int(key)), first, int(threshold),
                      0, 0))
        chunks.append(num_chunks(t.numel(), off))
        first += chunks[-1]
    return table, tuple(chunks)


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    # Values are moved as raw bits: any dtype of a supported size, NaN payloads included.
    return tensor.view(-1).view(_INT_OF_SIZE[tensor.element_size()])


def gather_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropped elements of every tensor, packed in stream order, and each chunk's start.

    Returns ``(values, starts)``: ``values`` (``tensors[0].dtype``) equals
    ``torch.cat([t.flatten()[~keep_i] for t in tensors])``; ``starts`` (int64, one per chunk of
    every tensor, tensor after tensor, plus the total) is what :func:`scatter_dropped_many`
    needs to put them back. Launches: two copies, a count, a cumsum and a gather, whatever the
    number of tensors; one host read-back (the total, to size ``values``).

    Args:
        tensors: contiguous tensors on one CUDA device (CPU under ``TRITON_INTERPRET=1``), with
            one element size (1, 2, 4 or 8 bytes; moved as raw bits).
        keys: one stream key per tensor, an int taken modulo ``2**64``.
        thresholds: drop thresholds in ``[0, 65536]``.
        offsets: global stream index of each tensor's first element.
    """
    offs = _check_pack(tensors, keys, thresholds, offsets)
    device, dtype = tensors[0].device, tensors[0].dtype
    table, chunks = _pack_table(tensors, keys, thresholds, offs)
    programs = sum(chunks)
    if programs == 0:
        return (torch.empty(0, dtype=dtype, device=device),
                torch.zeros(1, dtype=torch.int64, device=device))
    table_d, progmap = _upload(table, chunks, device)
    with _on_device(device):
        counts = torch.empty(programs + 1, dtype=torch.int64, device=device)
        _launch("count", programs, table_d, progmap, counts)
        starts = torch.cumsum(counts, 0)
        del counts
        total = int(starts[-1])  # sizing the output: the one host-device synchronisation
        values = torch.empty(total, dtype=dtype, device=device)
        if total:
            _launch(f"gather_{8 * values.element_size()}bit", programs, table_d, progmap,
                    _raw(values), starts)
    return values, starts


def scatter_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    values: torch.Tensor,
    starts: torch.Tensor,
) -> None:
    """Write ``values`` back into the dropped elements of every tensor; kept ones stay.

    ``values`` and ``starts`` come from :func:`gather_dropped_many` with the same arguments.
    Two copies and one launch, no host read-back.
    """
    offs = _check_pack(tensors, keys, thresholds, offsets)
    device, dtype = tensors[0].device, tensors[0].dtype
    table, chunks = _pack_table(tensors, keys, thresholds, offs)
    programs = sum(chunks)
    if starts.dtype != torch.int64 or starts.numel() != programs + 1 or starts.device != device:
        raise ValueError(f"starts must be an int64 tensor of {programs + 1} elements on {device}")
    if values.dtype != dtype or values.device != device or not values.is_contiguous():
        raise ValueError(
            f"values must be a contiguous {dtype} tensor on {device}, got {values.dtype} on "
            f"{values.device}"
        )
    if programs == 0 or values.numel() == 0:
        return
    table_d, progmap = _upload(table, chunks, device)
    with _on_device(device):
        _launch(f"scatter_{8 * values.element_size()}bit", programs, table_d, progmap,
                _raw(values), starts)


def gather_dropped(
    tensor: torch.Tensor, key: int, threshold: int, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_dropped_many` of one tensor."""
    return gather_dropped_many([tensor], [key], [threshold], [check_offset(offset)])


def scatter_dropped(
    tensor: torch.Tensor,
    key: int,
    threshold: int,
    values: torch.Tensor,
    starts: torch.Tensor,
    offset: int = 0,
) -> None:
    """:func:`scatter_dropped_many` of one tensor."""
    scatter_dropped_many([tensor], [key], [threshold], [check_offset(offset)], values, starts)

"""The ``triton`` backend: the stream, compare and scale fused in one pass on CUDA.

One program handles one chunk of the stream (4096 elements) of one tensor: it hashes the chunk's
1024 counters in registers (SplitMix64 in ``uint64``), spreads the four 16-bit lanes of each hash
over a ``[4, 1024]`` block, and loads, masks and stores the tensor's elements that fall in that
chunk. Each gradient is read once and written once, with no temporaries. All the gradients of a
call that share a device and dtype go in one launch: a small table (data pointer, size, offset,
key, threshold, scale per tensor, and each tensor's first program) is copied to the device
asynchronously from pinned memory, and each program finds its tensor by binary search in it. So
there is no host-device synchronisation, and the launch cost does not grow with the number of
parameters (a model with hundreds of small tensors would otherwise spend more time launching
kernels than masking). The bits equal the C++ kernel's and the reference's (bfloat16 is rounded
in the kernel by c10's rule, canonical NaN included; float16 NaNs may differ from the C++
kernel's in payload only).

Full update drop (:func:`gather_dropped`, :func:`scatter_dropped`): a counting pass writes the
number of dropped elements of each chunk, ``torch.cumsum`` turns the counts into offsets on the
device, and a packing pass writes each chunk's dropped values at its offset, in stream order
(an in-block prefix sum gives each element its slot). Memory: the values (``p`` times the tensor's
bytes) plus one int64 per chunk. Sizing the values tensor reads the total back to the host: one
synchronisation per saved tensor.

The kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how
the test suite checks them bit for bit on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from array import array
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from hf_dropgrad.kernels.checks import check_lengths, check_offset, check_offsets
from hf_dropgrad.kernels.stream import CHUNK, MASK64, RESOLUTION, signed64

__all__ = ["DTYPES", "gather_dropped", "interpreting", "mask_", "num_chunks", "scatter_dropped"]

#: Gradient dtypes :func:`mask_` takes, and their code in :func:`_mask_kernel`.
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DTYPES = tuple(_KINDS)
_ONE_BITS = array("I", array("f", [1.0]).tobytes())[0]
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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


@triton.jit
def _chunk_bits(key, chunk):
    """The ``[4, 1024]`` int32 16-bit values of stream chunk ``chunk`` (row = lane)."""
    b = tl.arange(0, 1024).to(tl.uint64)
    z = chunk.to(tl.uint64) * 1024 + b + 1
    z = key + z * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    lane = tl.arange(0, 4).to(tl.uint64)
    return ((z[None, :] >> (lane[:, None] * 16)) & 0xFFFF).to(tl.int32)


@triton.jit
def _chunk_index(chunk, offset):
    """Tensor index (int64, ``[4, 1024]``) of every position of stream chunk ``chunk``."""
    lane = tl.arange(0, 4).to(tl.int64)
    b = tl.arange(0, 1024).to(tl.int64)
    return chunk * 4096 + lane[:, None] * 1024 + b[None, :] - offset


#: Columns of a row of the table that :func:`mask_` passes to :func:`_mask_kernel`.
_ROW = 6  # data pointer, numel, offset, key (int64 bits), threshold, scale (float32 bits)


@triton.jit(do_not_specialize=["n_tensors"])
def _mask_kernel(table, starts, n_tensors, SEARCH_STEPS: tl.constexpr, KIND: tl.constexpr):
    """Mask one stream chunk of one tensor of a whole list (one launch per dtype).

    ``starts[i]`` is the first program of tensor ``i`` (``starts[n_tensors]`` the grid size); a
    program finds its tensor by binary search, then its row of ``table``. KIND: 0 float32,
    1 bfloat16 (as int16 bits), 2 float16.
    """
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0  # largest i with starts[i] <= pid, in [lo, hi)
    hi = lo + n_tensors
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(starts + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    row = table + lo * 6
    numel = tl.load(row + 1)
    offset = tl.load(row + 2)
    key = tl.load(row + 3).to(tl.uint64)
    threshold = tl.load(row + 4).to(tl.int32)
    scale = tl.load(row + 5).to(tl.int32).to(tl.float32, bitcast=True)
    chunk = pid - tl.load(starts + lo) + offset // 4096
    keep = _chunk_bits(key, chunk) >= threshold
    index = _chunk_index(chunk, offset)
    valid = (index >= 0) & (index < numel)
    factor = tl.where(keep, scale, 0.0)
    if KIND == 1:
        # bfloat16 travels as int16 bits and is rounded here exactly as c10::BFloat16(float)
        # (round to nearest even, NaN -> 0x7FC0), the C++ kernel's rule, on every platform.
        ptr = tl.load(row).to(tl.pointer_type(tl.int16))
        raw = tl.load(ptr + index, mask=valid, other=0).to(tl.uint16).to(tl.uint32)
        v = (raw << 16).to(tl.float32, bitcast=True) * factor
        u = v.to(tl.uint32, bitcast=True)
        r = tl.where(v != v, 0x7FC0, (u + ((u >> 16) & 1) + 0x7FFF) >> 16)
        tl.store(ptr + index, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
    elif KIND == 2:
        ptr = tl.load(row).to(tl.pointer_type(tl.float16))
        g = tl.load(ptr + index, mask=valid, other=0.0)
        tl.store(ptr + index, (g.to(tl.float32) * factor).to(tl.float16), mask=valid)
    else:
        ptr = tl.load(row).to(tl.pointer_type(tl.float32))
        g = tl.load(ptr + index, mask=valid, other=0.0)
        tl.store(ptr + index, g * factor, mask=valid)


@triton.jit(do_not_specialize=["numel", "offset", "first_chunk", "key_lo", "key_hi", "threshold"])
def _count_kernel(counts, numel, offset, first_chunk, key_lo, key_hi, threshold):
    pid = tl.program_id(0)
    chunk = pid.to(tl.int64) + first_chunk
    key = (key_hi.to(tl.uint64) << 32) | key_lo.to(tl.uint64)
    index = _chunk_index(chunk, offset)
    dropped = (_chunk_bits(key, chunk) < threshold) & (index >= 0) & (index < numel)
    tl.store(counts + pid, tl.sum(tl.sum(dropped.to(tl.int64), axis=1), axis=0))


@triton.jit(
    do_not_specialize=["numel", "offset", "first_chunk", "key_lo", "key_hi", "threshold"]
)
def _move_kernel(
    data, values, starts, numel, offset, first_chunk, key_lo, key_hi, threshold,
    GATHER: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = pid.to(tl.int64) + first_chunk
    key = (key_hi.to(tl.uint64) << 32) | key_lo.to(tl.uint64)
    index = tl.reshape(_chunk_index(chunk, offset), [4096])
    bits = tl.reshape(_chunk_bits(key, chunk), [4096])
    dropped = (bits < threshold) & (index >= 0) & (index < numel)
    d = dropped.to(tl.int64)
    # Slot of each dropped element: the chunk's start plus the dropped elements before it. Stream
    # order within a chunk is row-major [lane, counter], the order of the reshape above.
    slot = tl.load(starts + pid) + tl.cumsum(d, axis=0) - d
    if GATHER:
        tl.store(values + slot, tl.load(data + index, mask=dropped), mask=dropped)
    else:
        tl.store(data + index, tl.load(values + slot, mask=dropped), mask=dropped)


def _check_device(tensor: torch.Tensor, name: str) -> None:
    if tensor.device.type != "cuda" and not (tensor.device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{name} must be a CUDA tensor for the triton backend (CPU tensors only under "
            f"TRITON_INTERPRET=1), got one on {tensor.device}"
        )


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _key_halves(key: int) -> tuple[int, int]:
    key = int(key) & MASK64
    return key & 0xFFFFFFFF, key >> 32


def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
) -> None:
    """Mask every gradient in place: one kernel launch per device and dtype, whatever the count.

    A table of the tensors (data pointer, size, offset, key, threshold, scale) goes to the
    device with one asynchronous copy from pinned memory; every program of the launch masks one
    stream chunk of one tensor.

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
    groups: dict[tuple[torch.device, int], list[int]] = {}
    scale_bits = array("I", array("f", [float(x) for x in scales]).tobytes())
    for i, g in enumerate(grads):
        _check_device(g, f"grads[{i}]")
        if g.dtype not in _KINDS or g.layout is not torch.strided or not g.is_contiguous():
            raise ValueError(
                f"grads[{i}] must be a contiguous dense float32/bfloat16/float16 tensor, got "
                f"{g.dtype} {g.layout}{'' if g.is_contiguous() else ' (not contiguous)'}"
            )
        t = int(thresholds[i])
        if not 0 <= t <= RESOLUTION:
            raise ValueError(f"threshold must be in [0, {RESOLUTION}], got {t}")
        if g.numel() and not (t == 0 and scale_bits[i] == _ONE_BITS):
            groups.setdefault((g.device, _KINDS[g.dtype]), []).append(i)
    for (device, kind), index in groups.items():
        table = array("q")
        starts = array("q", [0])
        for i in index:
            g = grads[i]
            table.extend((g.data_ptr(), g.numel(), offs[i], signed64(int(keys[i])),
                          int(thresholds[i]), scale_bits[i]))
            starts.append(starts[-1] + num_chunks(g.numel(), offs[i]))
        table.extend(starts)
        packed = torch.frombuffer(table, dtype=torch.int64)
        if device.type == "cuda":  # pinned, so the copy is asynchronous: no synchronisation
            packed = packed.pin_memory().to(device, non_blocking=True)
        else:
            packed = packed.clone()  # own the memory: the array is freed on return
        rows = len(index) * _ROW
        with _on_device(device):
            _mask_kernel[(starts[-1],)](
                packed[:rows], packed[rows:], len(index),
                SEARCH_STEPS=max(1, len(index).bit_length()), KIND=kind, num_warps=4,
            )


def _check_packable(tensor: torch.Tensor) -> None:
    _check_device(tensor, "tensor")
    if (
        tensor.layout is not torch.strided
        or not tensor.is_contiguous()
        or tensor.element_size() not in _INT_OF_SIZE
    ):
        raise ValueError(
            "tensor must be a contiguous dense tensor with 1-, 2-, 4- or 8-byte elements, got "
            f"{tensor.dtype} {tensor.layout}"
        )


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    # Values are moved as raw bits: any dtype of a supported size, NaN payloads included.
    return tensor.view(-1).view(_INT_OF_SIZE[tensor.element_size()])


def gather_dropped(
    tensor: torch.Tensor, key: int, threshold: int, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropped elements of ``tensor`` packed in stream order, and each chunk's start.

    Returns ``(values, starts)``: ``values`` (``tensor.dtype``) equals
    ``tensor.flatten()[~keep]``; ``starts`` (int64, one per chunk plus the total) is what
    :func:`scatter_dropped` needs to put them back.
    """
    _check_packable(tensor)
    offset = check_offset(offset)
    t = int(threshold)
    n = tensor.numel()
    chunks = num_chunks(n, offset)
    starts = torch.zeros(chunks + 1, dtype=torch.int64, device=tensor.device)
    if chunks == 0:
        return torch.empty(0, dtype=tensor.dtype, device=tensor.device), starts
    lo, hi = _key_halves(key)
    with _on_device(tensor.device):
        _count_kernel[(chunks,)](starts[1:], n, offset, offset // CHUNK, lo, hi, t)
        torch.cumsum(starts, 0, out=starts)
        total = int(starts[-1])  # sizing the output is the one host-device synchronisation
        values = torch.empty(total, dtype=tensor.dtype, device=tensor.device)
        if total:
            _move_kernel[(chunks,)](
                _raw(tensor), _raw(values), starts, n, offset, offset // CHUNK, lo, hi, t,
                GATHER=True,
            )
    return values, starts


def scatter_dropped(
    tensor: torch.Tensor,
    key: int,
    threshold: int,
    values: torch.Tensor,
    starts: torch.Tensor,
    offset: int = 0,
) -> None:
    """Write ``values`` back into the dropped elements of ``tensor``.

    ``values`` and ``starts`` come from :func:`gather_dropped` with the same key, threshold,
    offset and number of elements; kept elements are not touched.
    """
    _check_packable(tensor)
    offset = check_offset(offset)
    n = tensor.numel()
    chunks = num_chunks(n, offset)
    if starts.dtype != torch.int64 or starts.numel() != chunks + 1:
        raise ValueError(f"starts must be an int64 tensor of {chunks + 1} elements")
    if values.dtype != tensor.dtype or values.device != tensor.device:
        raise ValueError(
            f"values must be a {tensor.dtype} tensor on {tensor.device}, got {values.dtype} "
            f"on {values.device}"
        )
    if chunks == 0 or values.numel() == 0:
        return
    lo, hi = _key_halves(key)
    with _on_device(tensor.device):
        _move_kernel[(chunks,)](
            _raw(tensor), _raw(values), starts, n, offset, offset // CHUNK, lo, hi, int(threshold),
            GATHER=False,
        )

"""The ``torch`` backend: the stream in plain torch ops, on any device. The oracle and the fallback.

Every element's 16 bits are computed from its own global index (one SplitMix64 hash per element,
where the fused backends share one hash between four elements), so any offset and any runs work
(:mod:`hf_dropgrad.kernels.checks`) and no index tensor has to be built on the host. Work goes
in spans of 2**18 local elements: the temporaries are a few int64 tensors of one span, whatever
the tensor's size, and full update drop needs no full-size mask. Every constant is a Python
scalar, so no small tensor is copied to the device.

This module implements the backend protocol (:class:`hf_dropgrad.kernels.protocol.Backend`); it
also takes non-contiguous tensors (their elements in logical, row-major order), which the fused
backends do not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from hf_dropgrad.kernels.checks import (
    check_lengths,
    check_offset,
    check_offsets,
    check_pairs,
    check_runs,
    check_threshold,
    run_chunks,
)
from hf_dropgrad.kernels.stream import CHUNK, GOLDEN, M1, M2, signed64

__all__ = [
    "SPAN",
    "gather_dropped_at",
    "gather_dropped_many",
    "keep_mask",
    "keep_mask_",
    "mask_",
    "mask_counted_",
    "mask_gather_dropped_",
    "mask_tensor_",
    "random_bits",
    "random_bits_at",
    "scatter_dropped_many",
]

#: Elements processed at once (bounds the temporaries).
SPAN = 1 << 18

_GOLDEN_S, _M1_S, _M2_S = signed64(GOLDEN), signed64(M1), signed64(M2)


def _xor_srl_(z: torch.Tensor, n: int, tmp: torch.Tensor) -> None:
    # z ^= z >>> n (logical shift; torch's >> on int64 is arithmetic, so mask the sign copies).
    torch.bitwise_right_shift(z, n, out=tmp)
    tmp.bitwise_and_((1 << (64 - n)) - 1)
    z.bitwise_xor_(tmp)


def random_bits_at(key: int, e: torch.Tensor) -> torch.Tensor:
    """The 16-bit values (int32) of the stream elements whose global indices ``e`` (int64)
    holds; ``e`` is overwritten."""
    # counter + 1 = (e // 4096) * 1024 + e % 1024 + 1, then h = mix64(key + (counter + 1) * GOLDEN)
    z = torch.bitwise_right_shift(e, 12).mul_(1024)
    tmp = torch.bitwise_and(e, 1023)
    z.add_(tmp).add_(1).mul_(_GOLDEN_S).add_(signed64(key))  # int64 arithmetic wraps mod 2**64
    _xor_srl_(z, 30, tmp)
    z.mul_(_M1_S)
    _xor_srl_(z, 27, tmp)
    z.mul_(_M2_S)
    _xor_srl_(z, 31, tmp)
    # lane j = (e % 4096) // 1024 reads bits 16j .. 16j + 15 (arithmetic shifts are fine: the
    # mask keeps the low 16 bits only).
    shift = e.bitwise_right_shift_(10).bitwise_and_(3).mul_(16)
    return z.bitwise_right_shift_(shift).bitwise_and_(0xFFFF).to(torch.int32)


def random_bits(
    key: int, start: int, count: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The 16-bit values (int32) of stream elements ``start .. start + count - 1``."""
    start = check_offset(start, "start")
    return random_bits_at(key, torch.arange(start, start + count, dtype=torch.int64, device=device))


def _indices(
    offset: int, run: int, stride: int, start: int, count: int, device: torch.device
) -> torch.Tensor:
    """Global stream indices (int64) of local elements ``start .. start + count - 1`` of a
    tensor at ``offset`` in runs of ``run`` with stride ``stride``."""
    j = torch.arange(start, start + count, dtype=torch.int64, device=device)
    if count == 0 or start // run == (start + count - 1) // run:  # within one run
        row = start // run
        return j.add_(offset + row * (stride - run))
    row = torch.div(j, run, rounding_mode="floor")
    return row.mul_(stride - run).add_(j).add_(offset)


def _spans(numel: int, offset: int, run: int, stride: int, device: torch.device
           ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, count, e)`` for the spans of a tensor: local elements ``start .. start + count
    - 1`` and their global indices ``e``."""
    for start in range(0, numel, SPAN):
        count = min(SPAN, numel - start)
        yield start, count, _indices(offset, run, stride, start, count, device)


def keep_mask(
    numel: int,
    key: int,
    threshold: int,
    device: torch.device | str | None = None,
    *,
    out: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Boolean keep decisions of stream elements ``offset .. offset + numel - 1``."""
    offset = check_offset(offset)
    if out is None:
        out = torch.empty(numel, dtype=torch.bool, device=device)
    flat = out.view(-1)
    for start, count, e in _spans(numel, offset, max(numel, 1), 0, flat.device):
        torch.ge(random_bits_at(key, e), threshold, out=flat[start : start + count])
    return out


def keep_mask_(out: torch.Tensor, key: int, threshold: int, offset: int) -> None:
    """Fill the contiguous bool tensor ``out`` with the keep decisions of stream elements
    ``offset .. offset + out.numel() - 1``."""
    keep_mask(out.numel(), key, check_threshold(threshold), out=out, offset=offset)


def mask_tensor_(
    grad: torch.Tensor,
    key: int,
    threshold: int,
    scale: float,
    offset: int = 0,
    run: int | None = None,
    stride: int | None = None,
) -> None:
    """Mask ``grad`` in place (it holds the stream elements ``offset ..`` in runs of ``run``
    with stride ``stride``; by default one run).

    ``float(g) * factor`` is rounded once to ``grad.dtype`` (``float64`` gradients are computed
    in ``float64``), exactly as the fused kernels do; the factor is ``scale`` rounded to the
    compute dtype, or ``0``.
    """
    offset = check_offset(offset)
    if threshold <= 0:
        return
    numel = grad.numel()
    (run,), (stride,) = check_runs(
        [numel], [offset], None if run is None else [run], None if stride is None else [stride]
    )
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    target = grad if grad.is_contiguous() else grad.contiguous()
    flat = target.view(-1)
    for start, count, e in _spans(numel, offset, run, stride, grad.device):
        seg = flat[start : start + count]
        keep = random_bits_at(key, e) >= threshold
        factor = keep.to(compute).mul_(scale)  # exactly scale (in the compute dtype) or 0
        if seg.dtype == compute:
            seg.mul_(factor)
        else:
            seg.copy_(factor.mul_(seg))
    if target is not grad:
        grad.copy_(target)


def _runs_of(
    tensors: Sequence[torch.Tensor],
    offsets: Sequence[int],
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
) -> tuple[list[int], list[int], list[int]]:
    offs = check_offsets(offsets, len(tensors))
    rs, ss = check_runs([t.numel() for t in tensors], offs, runs, strides)
    return offs, rs, ss


def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> None:
    """Mask every gradient in place, one after the other (:func:`mask_tensor_`)."""
    check_lengths(grads, keys, thresholds, scales)
    offs, rs, ss = _runs_of(grads, offsets or [0] * len(grads), runs, strides)
    for g, k, t, s, o, r, st in zip(grads, keys, thresholds, scales, offs, rs, ss, strict=True):
        mask_tensor_(g, k, check_threshold(t), s, o, r or None, st if r else None)


def _dropped_spans(
    tensor: torch.Tensor, key: int, threshold: int, offset: int, run: int, stride: int
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(start, count, dropped, counts)`` per span of the tensor's local elements: the drop
    decisions of elements ``start .. start + count - 1`` and the number of dropped elements of
    every chunk (of the run-by-run numbering) that the span touches, the first and last
    possibly shared with the neighbouring spans."""
    for start, count, e in _spans(tensor.numel(), offset, run, stride, tensor.device):
        j = torch.arange(start, start + count, dtype=torch.int64, device=tensor.device)
        # A chunk of the numbering begins where a run begins or a stream chunk begins.
        begins = torch.remainder(j, run).eq_(0).logical_or_(torch.remainder(e, CHUNK).eq_(0))
        dropped = random_bits_at(key, e) < threshold
        slot = torch.cumsum(begins, 0)  # 1 + index among the chunks begun in this span
        counts = torch.zeros(int(slot[-1]) + 1, dtype=torch.int64, device=tensor.device)
        counts.index_add_(0, slot, dropped.to(torch.int64))
        yield start, count, dropped, counts


def chunk_counts(
    tensor: torch.Tensor, key: int, threshold: int, offset: int, run: int, stride: int
) -> torch.Tensor:
    """Dropped elements (int64) of every chunk the tensor touches, in the run-by-run order."""
    parts: list[torch.Tensor] = []
    for _, _, _, counts in _dropped_spans(tensor, key, threshold, offset, run, stride):
        if parts and counts[0] > 0:  # the first chunk continues the previous span's last
            parts[-1][-1:] += counts[:1]
        parts.append(counts[1:])
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=tensor.device)
    assert out.numel() == run_chunks(tensor.numel(), offset, run, stride)
    return out


def _starts(counts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64, device=device), *counts]).cumsum(0)


def _device(tensors: Sequence[torch.Tensor]) -> torch.device:
    return tensors[0].device if len(tensors) else torch.device("cpu")


def _check_one_size(tensors: Sequence[torch.Tensor], keys: Sequence[int],
                    thresholds: Sequence[int]) -> None:
    if not len(keys) == len(thresholds) == len(tensors):
        raise ValueError(
            f"tensors, keys and thresholds differ in length: {len(tensors)}, {len(keys)}, "
            f"{len(thresholds)}"
        )
    for i, x in enumerate(tensors):
        if x.element_size() != tensors[0].element_size():
            raise ValueError(
                f"tensors must share one element size: tensors[{i}] is {x.dtype}, tensors[0] "
                f"{tensors[0].dtype}"
            )


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)


def gather_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropped values of every tensor, concatenated, and the start of each chunk's values.

    Returns ``(values, starts)`` as every backend does: ``values`` (``tensors[0].dtype``) holds
    each tensor's dropped elements in local order, tensor after tensor; ``starts[c]`` is where
    chunk ``c`` (the chunks of tensor 0 first, run by run) begins in ``values``, ``starts[-1]``
    their number.
    """
    _check_one_size(tensors, keys, thresholds)
    offs, rs, ss = _runs_of(tensors, offsets, runs, strides)
    device = _device(tensors)
    dtype = tensors[0].dtype if len(tensors) else torch.float32
    values: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    for x, k, t, o, r, s in zip(tensors, keys, thresholds, offs, rs, ss, strict=True):
        t = check_threshold(t)
        flat, parts = _flat(x), []
        for start, count, dropped, c in _dropped_spans(x, k, t, o, r, s):
            values.append(flat[start : start + count].masked_select(dropped).view(dtype))
            if parts and c[0] > 0:
                parts[-1][-1:] += c[:1]
            parts.append(c[1:])
        counts.extend(parts)
    flat_values = torch.cat(values) if values else torch.empty(0, dtype=dtype, device=device)
    return flat_values, _starts(counts, device)


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
    """Write ``values`` (from :func:`gather_dropped_many`) back into the dropped elements."""
    _check_one_size(tensors, keys, thresholds)
    offs, rs, ss = _runs_of(tensors, offsets, runs, strides)
    chunks = sum(run_chunks(x.numel(), o, r, s) for x, o, r, s in zip(tensors, offs, rs, ss))
    if starts.dtype != torch.int64 or starts.numel() != chunks + 1:
        raise ValueError(f"starts must be an int64 tensor of {chunks + 1} elements")
    total = int(starts[-1])
    if values.numel() != total or (len(tensors) and values.element_size()
                                   != tensors[0].element_size()):
        raise ValueError(
            f"values must hold {total} elements of the tensors' element size, got "
            f"{values.numel()} of {values.dtype}"
        )
    position = 0
    for x, k, t, o, r, s in zip(tensors, keys, thresholds, offs, rs, ss, strict=True):
        t = check_threshold(t)
        target = x if x.is_contiguous() else x.contiguous()
        flat = target.view(-1)
        for start, count, dropped, _ in _dropped_spans(x, k, t, o, r, s):
            n = int(dropped.sum())
            if n:
                part = values[position : position + n].view(x.dtype)
                flat[start : start + count].masked_scatter_(dropped, part)
                position += n
        if target is not x:
            x.copy_(target)


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
    """:func:`mask_`, and ``starts`` filled as :func:`gather_dropped_many` returns them for
    tensors of the grads' sizes, keys, thresholds, offsets and runs."""
    check_lengths(grads, keys, thresholds, scales)
    offs, rs, ss = _runs_of(grads, offsets, runs, strides)
    # The counts first: masking does not change them, but a gradient may be one of the tensors.
    counts = [chunk_counts(g, k, check_threshold(t), o, r, s)
              for g, k, t, o, r, s in zip(grads, keys, thresholds, offs, rs, ss, strict=True)]
    device = _device(grads)
    want = sum(c.numel() for c in counts) + 1
    if starts.dtype != torch.int64 or starts.numel() != want:
        raise ValueError(f"starts must be an int64 tensor of {want} elements")
    starts.copy_(_starts(counts, device))
    mask_(grads, keys, thresholds, scales, offs, rs, ss)


def gather_dropped_at(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
    starts: torch.Tensor,
) -> torch.Tensor:
    """The ``values`` of :func:`gather_dropped_many` (the starts are those it would return)."""
    values, own = gather_dropped_many(tensors, keys, thresholds, offsets, runs, strides)
    if starts.dtype != torch.int64 or starts.numel() != own.numel():
        raise ValueError(f"starts must be an int64 tensor of {own.numel()} elements")
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
    """:func:`mask_` of ``grads`` and :func:`gather_dropped_many` of ``tensors`` (each of its
    gradient's size; same keys, thresholds, offsets and runs)."""
    check_pairs(grads, tensors)
    values, starts = gather_dropped_many(tensors, keys, thresholds, offsets, runs, strides)
    mask_(grads, keys, thresholds, scales, offsets, runs, strides)
    return values, starts

"""The ``torch`` backend: the stream in plain torch ops, on any device. The oracle and the fallback.

Every element's 16 bits are computed from its own global index (one SplitMix64 hash per element,
where the fused backends share one hash between four elements), so any offset works and no
per-span index tensor has to be built on the host. Work goes in spans of 2**18 elements: the
temporaries are a few int64 tensors of one span, whatever the tensor's size. Every constant is a
Python scalar, so no small tensor is copied to the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_dropgrad.kernels.checks import check_offset
from hf_dropgrad.kernels.stream import CHUNK, GOLDEN, M1, M2, signed64

__all__ = [
    "SPAN",
    "chunk_starts",
    "gather_dropped",
    "gather_dropped_many",
    "keep_mask",
    "mask_",
    "mask_tensor_",
    "num_chunks",
    "random_bits",
    "scatter_dropped",
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


def random_bits(
    key: int, start: int, count: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The 16-bit values (int32) of stream elements ``start .. start + count - 1``."""
    start = check_offset(start, "start")
    e = torch.arange(start, start + count, dtype=torch.int64, device=device)
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
    for start in range(0, numel, SPAN):
        count = min(SPAN, numel - start)
        torch.ge(
            random_bits(key, offset + start, count, flat.device),
            threshold,
            out=flat[start : start + count],
        )
    return out


def mask_tensor_(
    grad: torch.Tensor, key: int, threshold: int, scale: float, offset: int = 0
) -> None:
    """Mask ``grad`` in place (it holds stream elements ``offset .. offset + numel - 1``).

    ``float(g) * factor`` is rounded once to ``grad.dtype`` (``float64`` gradients are computed
    in ``float64``), exactly as the fused kernels do; the factor is ``scale`` rounded to the
    compute dtype, or ``0``.
    """
    offset = check_offset(offset)
    if threshold <= 0:
        return
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    target = grad if grad.is_contiguous() else grad.contiguous()
    flat = target.view(-1)
    for start in range(0, flat.numel(), SPAN):
        seg = flat[start : start + SPAN]
        keep = random_bits(key, offset + start, seg.numel(), grad.device) >= threshold
        factor = keep.to(compute).mul_(scale)  # exactly scale (in the compute dtype) or 0
        if seg.dtype == compute:
            seg.mul_(factor)
        else:
            seg.copy_(factor.mul_(seg))
    if target is not grad:
        grad.copy_(target)


def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
) -> None:
    """Mask every gradient in place, one after the other (:func:`mask_tensor_`)."""
    offs = [0] * len(grads) if offsets is None else offsets
    for g, k, t, s, o in zip(grads, keys, thresholds, scales, offs, strict=True):
        mask_tensor_(g, k, t, s, o)


def num_chunks(numel: int, offset: int = 0) -> int:
    """Number of 4096-element stream chunks that elements ``offset .. offset + numel - 1`` touch."""
    if numel <= 0:
        return 0
    return (offset + numel - 1) // CHUNK - offset // CHUNK + 1


def _dropped(
    tensor: torch.Tensor, key: int, threshold: int, buffer: torch.Tensor | None, offset: int
) -> torch.Tensor:
    n = tensor.numel()
    out = None if buffer is None else buffer.view(-1)[:n]
    mask = keep_mask(n, key, threshold, tensor.device, out=out, offset=offset)
    return torch.logical_not(mask, out=mask).view(tensor.shape)


def gather_dropped(
    tensor: torch.Tensor,
    key: int,
    threshold: int,
    offset: int = 0,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """The values of the dropped elements of ``tensor`` in order (``masked_select``).

    Builds a 1-byte-per-element mask, into ``buffer`` (a bool tensor of at least ``numel``
    elements on the tensor's device) when given.
    """
    return tensor.masked_select(_dropped(tensor, key, threshold, buffer, offset))


def scatter_dropped(
    tensor: torch.Tensor,
    key: int,
    threshold: int,
    values: torch.Tensor,
    offset: int = 0,
    buffer: torch.Tensor | None = None,
) -> None:
    """Write ``values`` (from :func:`gather_dropped`) back into the dropped elements."""
    tensor.masked_scatter_(_dropped(tensor, key, threshold, buffer, offset), values)


def _chunk_counts(dropped: torch.Tensor, offset: int) -> torch.Tensor:
    """Dropped elements per stream chunk (int64) of a flat bool mask starting at ``offset``."""
    n = dropped.numel()
    head = min(n, (-offset) % CHUNK)  # elements before the first chunk boundary
    full = (n - head) // CHUNK
    parts = []
    if head:
        parts.append(dropped[:head].sum().view(1))
    if full:
        parts.append(dropped[head : head + full * CHUNK].view(full, CHUNK).sum(1))
    if head + full * CHUNK < n:
        parts.append(dropped[head + full * CHUNK :].sum().view(1))
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=dropped.device)
    return torch.cat(parts)


def chunk_starts(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
) -> torch.Tensor:
    """The ``starts`` of :func:`gather_dropped_many` (int64): they depend on each tensor's size,
    key, threshold and offset only, not on its values or dtype."""
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    counts: list[torch.Tensor] = [torch.zeros(1, dtype=torch.int64, device=device)]
    for x, k, t, o in zip(tensors, keys, thresholds, offsets, strict=True):
        keep = keep_mask(x.numel(), k, t, x.device, offset=check_offset(o))
        counts.append(_chunk_counts(torch.logical_not(keep), o))
    return torch.cat(counts).cumsum(0)


def gather_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    *,
    buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropped values of every tensor, concatenated, and the start of each chunk's values.

    Returns ``(values, starts)`` as the fused backends do: ``values`` (``tensors[0].dtype``)
    holds each tensor's dropped elements in stream order, tensor after tensor; ``starts[c]`` is
    where chunk ``c`` (the chunks of tensor 0 first) begins in ``values``, ``starts[-1]`` their
    number. Builds a 1-byte-per-element mask per tensor, into ``buffer`` when given.
    """
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    dtype = tensors[0].dtype if len(tensors) else torch.float32
    values: list[torch.Tensor] = []
    counts: list[torch.Tensor] = [torch.zeros(1, dtype=torch.int64, device=device)]
    for x, k, t, o in zip(tensors, keys, thresholds, offsets, strict=True):
        dropped = _dropped(x, k, t, buffer, check_offset(o))
        values.append(x.masked_select(dropped).view(dtype))
        counts.append(_chunk_counts(dropped.view(-1), o))
    flat = torch.cat(values) if values else torch.empty(0, dtype=dtype, device=device)
    return flat, torch.cat(counts).cumsum(0)


def scatter_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    values: torch.Tensor,
    starts: torch.Tensor,
    *,
    buffer: torch.Tensor | None = None,
) -> None:
    """Write ``values`` (from :func:`gather_dropped_many`) back into the dropped elements."""
    first = 0
    bounds = [0]
    for x, o in zip(tensors, offsets, strict=True):
        first += num_chunks(x.numel(), o)
        bounds.append(first)
    ends = starts[bounds].tolist()  # one read-back for all the tensors
    for i, (x, k, t, o) in enumerate(zip(tensors, keys, thresholds, offsets, strict=True)):
        if ends[i + 1] > ends[i]:
            scatter_dropped(x, k, t, values[ends[i] : ends[i + 1]].view(x.dtype), o, buffer)

"""The ``torch`` backend: the stream in plain torch ops, on any device. The oracle and the fallback.

Every element's 16 bits are computed from its own global index (one SplitMix64 hash per element,
where the fused backends share one hash between four elements), so any offset works and no
per-span index tensor has to be built on the host. Work goes in spans of 2**18 elements: the
temporaries are a few int64 tensors of one span, whatever the tensor's size. Every constant is a
Python scalar, so no small tensor is copied to the device.
"""

from __future__ import annotations

import torch

from hf_dropgrad.kernels.checks import check_offset
from hf_dropgrad.kernels.stream import GOLDEN, M1, M2, signed64

__all__ = ["SPAN", "gather_dropped", "keep_mask", "mask_", "random_bits", "scatter_dropped"]

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


def mask_(grad: torch.Tensor, key: int, threshold: int, scale: float, offset: int = 0) -> None:
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

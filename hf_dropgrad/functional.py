"""The maths of DropGrad in one place.

A gradient element ``g`` becomes ``g * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)``.
The Bernoulli draws come from a *counter-based* stream: the 16 random bits of element
``e`` of a tensor are a pure function of a 64-bit ``key`` and ``e``. The key is derived
from ``(seed, step, parameter position)``, so the mask of a step does not depend on
torch's global RNG, on the device, on how many processes run, or on what happened
before the step — every data-parallel replica draws the same mask, and a resumed run
draws the masks an uninterrupted run would have drawn.

The stream is SplitMix64 seeded with ``key``; element ``e`` reads 16 bits of hash
number ``(e // 4096) * 1024 + e % 1024`` at lane ``(e % 4096) // 1024`` (a
structure-of-arrays layout, so the compiled kernel's loops vectorise). An element is
dropped when its 16-bit value is below ``threshold = round(p * 65536)``, so the
realised drop probability is ``threshold / 65536`` (within ``2**-17`` of ``p``) and
survivors are multiplied by ``65536 / (65536 - threshold)``, the reciprocal of the
realised keep probability: the masked gradient is unbiased.

Two implementations follow torch.optim's single-tensor / multi-tensor pattern:
:func:`mask_reference_` (pure torch, any device, the test oracle) and :func:`mask_`
(one fused, vectorised C++ pass over all CPU gradients when the extension builds,
the reference otherwise). They agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "RESOLUTION",
    "derive_key",
    "drop_threshold",
    "keep_mask",
    "keep_mask_reference",
    "keep_scale",
    "mask_",
    "mask_reference_",
    "mix64",
    "random_bits",
    "realised_drop_rate",
]

GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1

#: Random bits per element; the drop probability is a multiple of 1 / RESOLUTION.
RESOLUTION = 1 << 16
#: Elements per chunk of the stream, and hashes (counters) per chunk.
CHUNK = 4096
WIDTH = 1024
#: Elements the reference path processes at once (bounds its temporaries).
_SPAN = 64 * CHUNK

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def mix64(z: int) -> int:
    """SplitMix64's finaliser on a Python int (mod ``2**64``)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def derive_key(seed: int, step: int, index: int) -> int:
    """Key of the mask of parameter ``index`` at optimizer step ``step``.

    A function of its three arguments only, in ``[0, 2**64)``.
    """
    key = mix64(seed + GOLDEN)
    key = mix64(key + (step + 1) * GOLDEN)
    return mix64(key + (index + 1) * GOLDEN)


def drop_threshold(p: float) -> int:
    """Integer threshold in ``[0, RESOLUTION]``; an element whose bits are below it is dropped."""
    return min(RESOLUTION, max(0, round(p * RESOLUTION)))


def realised_drop_rate(p: float) -> float:
    """The exact drop probability that rate ``p`` realises (within ``2**-17`` of ``p``)."""
    return drop_threshold(p) / RESOLUTION


def keep_scale(threshold: int) -> float:
    """Factor for surviving elements: the reciprocal of the realised keep probability.

    ``0.0`` when everything is dropped, so ``p = 1`` never divides by zero.
    """
    if threshold >= RESOLUTION:
        return 0.0
    return RESOLUTION / (RESOLUTION - threshold)


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(z: torch.Tensor, n: int) -> torch.Tensor:
    # Logical right shift of int64 data (torch's >> is arithmetic).
    return (z >> n) & ((1 << (64 - n)) - 1)


def _mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64 on every torch backend.
    z = (z ^ _srl(z, 30)) * _signed(_M1)
    z = (z ^ _srl(z, 27)) * _signed(_M2)
    return z ^ _srl(z, 31)


def random_bits(
    key: int, start: int, count: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The stream's 16-bit values (as int32) of elements ``start .. start + count - 1``.

    ``start`` must be a multiple of the chunk size (4096).
    """
    if start % CHUNK:
        raise ValueError(f"start must be a multiple of {CHUNK}, got {start}")
    first_chunk = start // CHUNK
    n_chunks = -(-count // CHUNK)
    counters = torch.arange(
        first_chunk * WIDTH, (first_chunk + n_chunks) * WIDTH, dtype=torch.int64, device=device
    )
    h = _mix64_tensor((counters + 1) * _signed(GOLDEN) + _signed(key))
    shifts = torch.tensor([0, 16, 32, 48], dtype=torch.int64, device=device).view(1, 4, 1)
    # Arithmetic shifts are fine here: the mask keeps only the low 16 bits.
    bits = h.view(n_chunks, 1, WIDTH) >> shifts
    return (bits & 0xFFFF).to(torch.int32).reshape(-1)[:count]


def keep_mask_reference(
    numel: int,
    key: int,
    threshold: int,
    device: torch.device | str | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean keep decisions of ``numel`` elements (pure torch), into ``out`` if given."""
    if out is None:
        out = torch.empty(numel, dtype=torch.bool, device=device)
    out = out.view(-1)
    for start in range(0, numel, _SPAN):
        count = min(_SPAN, numel - start)
        torch.ge(random_bits(key, start, count, device), threshold, out=out[start : start + count])
    return out


def mask_reference_(grad: torch.Tensor, key: int, threshold: int, scale: float) -> None:
    """Mask ``grad`` in place, one span at a time (single-tensor reference path).

    ``float(g) * factor`` is rounded once to ``grad.dtype`` (``float64`` grads are
    computed in ``float64``), exactly as the compiled kernel does.
    """
    if threshold <= 0:
        return
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    target = grad if grad.is_contiguous() else grad.contiguous()
    flat = target.view(-1)
    factor_keep = torch.tensor(scale, dtype=compute, device=grad.device)
    factor_drop = torch.zeros((), dtype=compute, device=grad.device)
    for start in range(0, flat.numel(), _SPAN):
        seg = flat[start : start + _SPAN]
        keep = random_bits(key, start, seg.numel(), grad.device) >= threshold
        factor = torch.where(keep, factor_keep, factor_drop)
        if seg.dtype == compute:
            seg.mul_(factor)
        else:
            seg.copy_(seg.to(compute) * factor)
    if target is not grad:
        grad.copy_(target)


def _kernel() -> Any:
    """The compiled CPU kernel's module, or ``None`` where it cannot be built."""
    from hf_dropgrad import _cpu_kernel

    return _cpu_kernel if _cpu_kernel.load() is not None else None


def _use_kernel(grad: torch.Tensor) -> bool:
    # Exact type: tensor subclasses (DTensor, ...) do not own plain contiguous CPU storage.
    return (
        type(grad) is torch.Tensor
        and grad.device.type == "cpu"
        and grad.dtype in _FAST_DTYPES
        and grad.is_contiguous()
    )


def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
) -> None:
    """Mask every gradient in place (the vectorised path).

    CPU gradients in fp32/bf16/fp16 go through one call of the fused C++ kernel
    (random bits, compare and scale in a single pass, no temporaries); anything else
    (CUDA, float64, non-contiguous, or no compiler) takes :func:`mask_reference_`.
    """
    fast: list[int] = []
    kernel = _kernel() if any(_use_kernel(g) for g in grads) else None
    for i, grad in enumerate(grads):
        if thresholds[i] <= 0:
            continue
        if kernel is not None and _use_kernel(grad):
            fast.append(i)
        else:
            mask_reference_(grad, keys[i], thresholds[i], scales[i])
    if fast:
        kernel.mask_(
            [grads[i] for i in fast],
            [keys[i] for i in fast],
            [thresholds[i] for i in fast],
            [scales[i] for i in fast],
        )


def keep_mask(
    numel: int,
    key: int,
    threshold: int,
    device: torch.device | str | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean keep decisions of ``numel`` elements on ``device`` (compiled on CPU if possible).

    ``out``: a contiguous bool tensor of ``numel`` elements to fill instead of a new one.
    """
    if torch.device(device or "cpu").type == "cpu":
        kernel = _kernel()
        if kernel is not None:
            return kernel.keep_mask(numel, key, threshold, out=out)
    return keep_mask_reference(numel, key, threshold, device, out=out)


def _packable(tensor: torch.Tensor) -> bool:
    from hf_dropgrad import _cpu_kernel

    return _cpu_kernel.packable(tensor)


class DroppedValues:
    """The values of a tensor's dropped elements, saved by :func:`save_dropped`.

    Holds ``p * numel`` values of the tensor's dtype (plus, on the compiled path, one int64
    offset per 4096 elements); :meth:`restore` writes them back.
    """

    __slots__ = ("_key", "_offsets", "_tensor", "_threshold", "_values")

    def __init__(
        self,
        tensor: torch.Tensor,
        key: int,
        threshold: int,
        values: torch.Tensor,
        offsets: torch.Tensor | None,
    ) -> None:
        self._tensor, self._key, self._threshold = tensor, key, threshold
        self._values, self._offsets = values, offsets

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor the values belong to."""
        return self._tensor

    def restore(self, buffer: torch.Tensor | None = None) -> None:
        """Write the saved values back into the dropped elements; kept elements are untouched.

        ``buffer``: a bool tensor of at least ``numel`` elements on the tensor's device, reused
        for the mask on the pure-torch path (the compiled path needs none).
        """
        if self._offsets is not None:
            _kernel().scatter_dropped(
                self._tensor, self._key, self._threshold, self._values, self._offsets
            )
            return
        dropped = _dropped_mask(self._tensor, self._key, self._threshold, buffer)
        self._tensor.masked_scatter_(dropped, self._values)


def _dropped_mask(
    tensor: torch.Tensor, key: int, threshold: int, buffer: torch.Tensor | None
) -> torch.Tensor:
    n = tensor.numel()
    out = None if buffer is None else buffer[:n]
    mask = keep_mask(n, key, threshold, tensor.device, out=out)
    return torch.logical_not(mask, out=mask).view_as(tensor)


def needs_mask_buffer(tensor: torch.Tensor) -> bool:
    """Whether :func:`save_dropped` / :meth:`DroppedValues.restore` build a full-size mask."""
    return not (_packable(tensor) and _kernel() is not None)


def save_dropped(
    tensor: torch.Tensor, key: int, threshold: int, buffer: torch.Tensor | None = None
) -> DroppedValues:
    """Save the values of the elements of ``tensor`` that the stream ``(key, threshold)`` drops.

    Full update drop's memory: only the dropped values are kept (``p`` times the tensor's bytes).
    Dense contiguous CPU tensors go through the compiled kernel, which regenerates the keep
    decisions chunk by chunk and packs the dropped values in parallel, with no full-size mask;
    anything else builds the mask (into ``buffer`` when given, see
    :meth:`DroppedValues.restore`) and uses ``masked_select``.
    """
    kernel = _kernel() if _packable(tensor) else None
    if kernel is not None:
        values, offsets = kernel.gather_dropped(tensor, key, threshold)
        return DroppedValues(tensor, key, threshold, values, offsets)
    dropped = _dropped_mask(tensor, key, threshold, buffer)
    return DroppedValues(tensor, key, threshold, tensor.masked_select(dropped), None)

"""The maths of DropGrad in one place, and the entry points every caller uses.

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

``e`` is a *global* index: every entry point takes the offset of the tensor's first element
(default 0), so a contiguous shard of a parameter masked with its offset gets exactly the
decisions of those elements of the full parameter (what sharded engines need).

Two paths follow torch.optim's single-tensor / multi-tensor pattern: :func:`mask_reference_`
(pure torch, any device, the test oracle) and :func:`mask_` (the fused backends of
:mod:`hf_dropgrad.kernels`: C++ on CPU, Triton on CUDA, chosen per tensor by
:func:`hf_dropgrad.kernels.choose`). They agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_dropgrad import kernels
from hf_dropgrad.kernels import reference as _reference
from hf_dropgrad.kernels.checks import check_lengths, check_offset, check_offsets
from hf_dropgrad.kernels.stream import CHUNK, GOLDEN, MASK64, RESOLUTION, WIDTH
from hf_dropgrad.kernels.stream import M1 as _M1
from hf_dropgrad.kernels.stream import M2 as _M2

__all__ = [
    "CHUNK",
    "GOLDEN",
    "RESOLUTION",
    "WIDTH",
    "DroppedValues",
    "derive_key",
    "drop_threshold",
    "keep_mask",
    "keep_mask_reference",
    "keep_scale",
    "mask_",
    "mask_reference_",
    "mix64",
    "needs_mask_buffer",
    "random_bits",
    "realised_drop_rate",
    "save_dropped",
]

_MASK64 = MASK64


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


#: The stream's 16-bit values (int32) of elements ``start .. start + count - 1``.
random_bits = _reference.random_bits
#: Boolean keep decisions of elements ``offset .. offset + numel - 1`` (pure torch).
keep_mask_reference = _reference.keep_mask
#: Mask one gradient in place, span by span: the single-tensor reference path, any device.
#: ``float(g) * factor`` is rounded once to the gradient's dtype, as the fused kernels do.
mask_reference_ = _reference.mask_


def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
) -> None:
    """Mask every gradient in place (the vectorised path).

    Args:
        grads: the gradients (any device and floating dtype; written in place).
        keys: one stream key per gradient (:func:`derive_key`).
        thresholds: drop thresholds in ``[0, 65536]`` (:func:`drop_threshold`).
        scales: factor of kept elements (:func:`keep_scale`).
        offsets: global stream index of each gradient's first element, default 0: masking a
            contiguous slice of a tensor with its offset equals the same slice of the tensor's
            mask.

    Each gradient goes to the backend :func:`hf_dropgrad.kernels.choose` picks: all CPU
    gradients in one call of the fused C++ kernel, CUDA gradients through one Triton launch each,
    the rest through :func:`mask_reference_`. Non-contiguous gradients are masked through a
    contiguous copy. No host-device synchronisation.
    """
    n = check_lengths(grads, keys, thresholds, scales)
    offs = check_offsets(offsets, n)
    fused: dict[str, list[int]] = {}
    requested = kernels.requested_backend()  # once per call, not once per gradient
    for i, grad in enumerate(grads):
        if thresholds[i] <= 0:
            continue
        backend = kernels.choose(grad, "mask", requested)
        if backend == "torch":
            _reference.mask_(grad, keys[i], thresholds[i], scales[i], offs[i])
        else:
            fused.setdefault(backend, []).append(i)
    for backend, index in fused.items():
        tensors = [grads[i] if grads[i].is_contiguous() else grads[i].contiguous() for i in index]
        kernels.backend_module(backend).mask_(
            tensors,
            [keys[i] for i in index],
            [thresholds[i] for i in index],
            [scales[i] for i in index],
            [offs[i] for i in index],
        )
        for i, tensor in zip(index, tensors):
            if tensor is not grads[i]:
                grads[i].copy_(tensor)


def keep_mask(
    numel: int,
    key: int,
    threshold: int,
    device: torch.device | str | None = None,
    *,
    out: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Boolean keep decisions of elements ``offset .. offset + numel - 1`` on ``device``.

    Made by the C++ kernel on CPU where it is available (and ``HF_DROPGRAD_BACKEND`` is not
    ``torch``), by the reference otherwise. ``out``: a contiguous bool tensor of ``numel``
    elements to fill instead of a new one.
    """
    offset = check_offset(offset)
    if torch.device(device or "cpu").type == "cpu" and kernels.requested_backend() != "torch":
        from hf_dropgrad.kernels import cpp

        if cpp.load() is not None:
            return cpp.keep_mask(numel, key, threshold, out=out, offset=offset)
    return _reference.keep_mask(numel, key, threshold, device, out=out, offset=offset)


class DroppedValues:
    """The values of a tensor's dropped elements, saved by :func:`save_dropped`.

    Holds ``p * numel`` values of the tensor's dtype (plus, on the fused backends, one int64
    per 4096-element chunk); :meth:`restore` writes them back.
    """

    __slots__ = ("_backend", "_key", "_offset", "_starts", "_target", "_tensor", "_threshold",
                 "_values")

    def __init__(
        self,
        tensor: torch.Tensor,
        key: int,
        threshold: int,
        values: torch.Tensor,
        starts: torch.Tensor | None,
        *,
        offset: int = 0,
        backend: str = "torch",
    ) -> None:
        self._tensor, self._key, self._threshold = tensor, key, threshold
        self._values, self._starts = values, starts
        self._offset, self._backend = offset, backend

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor the values belong to."""
        return self._tensor

    @property
    def backend(self) -> str:
        """The backend that saved the values (and restores them)."""
        return self._backend

    def restore(self, buffer: torch.Tensor | None = None) -> None:
        """Write the saved values back into the dropped elements; kept elements are untouched.

        ``buffer``: a bool tensor of at least ``numel`` elements on the tensor's device, reused
        for the mask on the reference path (the fused backends need none).
        """
        if self._backend == "torch":
            _reference.scatter_dropped(
                self._tensor, self._key, self._threshold, self._values, self._offset, buffer
            )
            return
        target = self._tensor if self._tensor.is_contiguous() else self._tensor.contiguous()
        kernels.backend_module(self._backend).scatter_dropped(
            target, self._key, self._threshold, self._values, self._starts, self._offset
        )
        if target is not self._tensor:
            self._tensor.copy_(target)


def needs_mask_buffer(tensor: torch.Tensor) -> bool:
    """Whether :func:`save_dropped` / :meth:`DroppedValues.restore` build a full-size mask."""
    return kernels.choose(tensor, "pack") == "torch"


def save_dropped(
    tensor: torch.Tensor,
    key: int,
    threshold: int,
    buffer: torch.Tensor | None = None,
    offset: int = 0,
) -> DroppedValues:
    """Save the values of the elements of ``tensor`` that the stream ``(key, threshold)`` drops.

    ``tensor`` holds stream elements ``offset .. offset + numel - 1``. Full update drop's memory:
    only the dropped values are kept (``p`` times the tensor's bytes). The fused backends
    regenerate the keep decisions chunk by chunk and pack the dropped values in parallel, with no
    full-size mask; the reference builds the mask (into ``buffer`` when given, see
    :meth:`DroppedValues.restore`) and uses ``masked_select``.
    """
    offset = check_offset(offset)
    backend = kernels.choose(tensor, "pack")
    if backend == "torch":
        values = _reference.gather_dropped(tensor, key, threshold, offset, buffer)
        return DroppedValues(tensor, key, threshold, values, None, offset=offset)
    source = tensor if tensor.is_contiguous() else tensor.contiguous()
    values, starts = kernels.backend_module(backend).gather_dropped(
        source, key, threshold, offset
    )
    return DroppedValues(tensor, key, threshold, values, starts, offset=offset, backend=backend)

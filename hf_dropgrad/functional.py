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
(pure torch, any device, the test oracle) and :func:`mask_` (the ``hf_dropgrad::mask_`` torch
op: C++ on CPU, Triton on CUDA; the backend of each tensor is chosen by
:func:`hf_dropgrad.kernels.choose`, which alone reads ``HF_DROPGRAD_BACKEND``). They agree bit
for bit. Full update drop's :func:`save_dropped_many` / :meth:`DroppedValues.restore` go the
same way, one call per device and dtype for all the tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

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
    "mask_and_save_dropped_many",
    "mask_",
    "mask_reference_",
    "mix64",
    "needs_mask_buffer",
    "random_bits",
    "realised_drop_rate",
    "save_dropped",
    "save_dropped_many",
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
mask_reference_ = _reference.mask_tensor_


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

    Each gradient goes to the backend :func:`hf_dropgrad.kernels.choose` picks; the gradients of
    one backend and device go in one call (the ``hf_dropgrad::mask_`` op: one parallel pass of
    the C++ kernel on CPU, one Triton launch per dtype on CUDA), the rest through the reference.
    Non-contiguous gradients are masked through a contiguous copy. No host-device
    synchronisation. ``torch.compile(fullgraph=True)`` traces it as one op per group.
    """
    n = check_lengths(grads, keys, thresholds, scales)
    offs = check_offsets(offsets, n)
    groups: dict[tuple[str, torch.device], list[int]] = {}
    requested = kernels.requested_backend()  # once per call, not once per gradient
    for i, grad in enumerate(grads):
        if thresholds[i] <= 0:
            continue
        groups.setdefault((kernels.choose(grad, "mask", requested), grad.device), []).append(i)
    for (backend, device), index in groups.items():
        fused = backend != "torch"
        tensors = [
            grads[i] if not fused or grads[i].is_contiguous() else grads[i].contiguous()
            for i in index
        ]
        kernels.dispatch(backend, device).mask_(
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

    Made by the backend :func:`hf_dropgrad.kernels.choose` picks for the output (the
    ``hf_dropgrad::keep_mask_`` op: the C++ kernel on CPU), like every other entry point.
    ``out``: a contiguous bool tensor of ``numel`` elements to fill instead of a new one.
    """
    offset = check_offset(offset)
    if out is None:
        out = torch.empty(numel, dtype=torch.bool, device=device)
    elif out.dtype != torch.bool or not out.is_contiguous() or out.numel() != numel:
        raise ValueError(
            f"out must be a contiguous bool tensor of {numel} elements, got {out.dtype} "
            f"{tuple(out.shape)}"
        )
    backend = kernels.choose(out, "keep")
    module = kernels.dispatch(backend, out.device)
    if module is kernels.ops:
        module.keep_mask_(out, key, threshold, offset)
    elif backend == "triton":  # Triton's interpreter on a CPU tensor
        kernels.ops.triton_keep_mask_(module, out, key, threshold, offset)
    else:
        _reference.keep_mask(numel, key, threshold, out.device, out=out, offset=offset)
    return out


class _Group(NamedTuple):
    """Tensors of one backend, device and dtype, saved by one call."""

    backend: str
    tensors: list[torch.Tensor]
    keys: list[int]
    thresholds: list[int]
    offsets: list[int]
    values: torch.Tensor
    starts: torch.Tensor


class DroppedValues:
    """The values of the dropped elements of tensors, saved by :func:`save_dropped_many`.

    Holds ``p * numel`` values of each tensor's dtype (plus one int64 per 4096-element chunk);
    :meth:`restore` writes them back. Built by :func:`save_dropped_many`, or by hand for one
    tensor from the values and chunk starts of a ``gather_dropped_many`` call.
    """

    __slots__ = ("_groups",)

    def __init__(
        self,
        tensor: torch.Tensor,
        key: int,
        threshold: int,
        values: torch.Tensor,
        starts: torch.Tensor,
        *,
        offset: int = 0,
        backend: str = "torch",
    ) -> None:
        offset = check_offset(offset)
        self._groups = [_Group(backend, [tensor], [key], [threshold], [offset], values, starts)]

    @classmethod
    def _of_groups(cls, groups: list[_Group]) -> DroppedValues:
        out = cls.__new__(cls)
        out._groups = groups
        return out

    @property
    def _values(self) -> torch.Tensor:
        (group,) = self._groups
        return group.values

    @property
    def _starts(self) -> torch.Tensor:
        (group,) = self._groups
        return group.starts

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The tensors the values belong to."""
        return [t for g in self._groups for t in g.tensors]

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor the values belong to (of a :func:`save_dropped` of one tensor)."""
        (tensor,) = self.tensors
        return tensor

    @property
    def backends(self) -> list[str]:
        """The backend that saved (and restores) each of :attr:`tensors`."""
        return [g.backend for g in self._groups for _ in g.tensors]

    @property
    def backend(self) -> str:
        """The backend that saved the values (of a :func:`save_dropped` of one tensor)."""
        (backend,) = self.backends
        return backend

    def restore(self, buffer: torch.Tensor | None = None) -> None:
        """Write the saved values back into the dropped elements; kept elements are untouched.

        ``buffer``: a bool tensor of at least ``numel`` elements of the largest tensor on the
        reference path, on its device, reused for its mask (by default one is made per device;
        the fused backends need none).
        """
        buffers = _mask_buffers(self._groups, buffer)
        for g in self._groups:
            device = g.tensors[0].device
            if g.backend == "torch":
                _reference.scatter_dropped_many(
                    g.tensors, g.keys, g.thresholds, g.offsets, g.values, g.starts,
                    buffer=buffers.get(device),
                )
                continue
            targets = [t if t.is_contiguous() else t.contiguous() for t in g.tensors]
            kernels.dispatch(g.backend, device).scatter_dropped_many(
                targets, g.keys, g.thresholds, g.offsets, g.values, g.starts
            )
            for target, tensor in zip(targets, g.tensors):
                if target is not tensor:
                    tensor.copy_(target)


def _mask_buffers(
    groups: Sequence[_Group] | Sequence[tuple[str, list[torch.Tensor]]],
    buffer: torch.Tensor | None,
) -> dict[torch.device, torch.Tensor]:
    """One bool buffer per device for the reference path's masks, sized for its largest tensor.

    The reference path of full update drop (non-contiguous parameters, tensor subclasses, no
    fused backend) needs a full-size mask per tensor; reusing one makes that 1 byte per element
    of the largest such tensor, not of all of them.
    """
    sizes: dict[torch.device, int] = {}
    for group in groups:
        backend, tensors = group[0], group[1]
        if backend == "torch":
            for t in tensors:
                sizes[t.device] = max(sizes.get(t.device, 0), t.numel())
    out = {}
    for device, size in sizes.items():
        if buffer is not None and buffer.device == device and buffer.numel() >= size:
            out[device] = buffer
        else:
            out[device] = torch.empty(size, dtype=torch.bool, device=device)
    return out


def needs_mask_buffer(tensor: torch.Tensor) -> bool:
    """Whether :func:`save_dropped` / :meth:`DroppedValues.restore` build a full-size mask."""
    return kernels.choose(tensor, "pack") == "torch"


def save_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int] | None = None,
    buffer: torch.Tensor | None = None,
) -> DroppedValues:
    """Save the values of the elements of every tensor that its stream ``(key, threshold)`` drops.

    ``tensors[i]`` holds stream elements ``offsets[i] .. offsets[i] + numel - 1`` (default 0).
    Full update drop's memory: only the dropped values are kept (``p`` times the tensors' bytes,
    plus 8 bytes per 4096 elements). The backend of each tensor is chosen once, here, by
    :func:`hf_dropgrad.kernels.choose`; the tensors of one backend, device and dtype are saved by
    one call (``hf_dropgrad::gather_dropped_many``: on CPU one counting and one packing pass over
    all of them, in parallel, with no full-size mask). The reference path builds a mask per
    tensor (into ``buffer`` when given, see :meth:`DroppedValues.restore`) and uses
    ``masked_select``.
    """
    n = len(tensors)
    if not len(keys) == len(thresholds) == n:
        raise ValueError(
            f"tensors, keys and thresholds differ in length: {n}, {len(keys)}, {len(thresholds)}"
        )
    offs = check_offsets(offsets, n)
    requested = kernels.requested_backend()
    index: dict[tuple[str, torch.device, torch.dtype], list[int]] = {}
    for i, tensor in enumerate(tensors):
        backend = kernels.choose(tensor, "pack", requested)
        index.setdefault((backend, tensor.device, tensor.dtype), []).append(i)
    plans = [(backend, [tensors[i] for i in ix]) for (backend, _, _), ix in index.items()]
    buffers = _mask_buffers(plans, buffer)
    groups = []
    for (backend, device, _), ix in index.items():
        group = [tensors[i] for i in ix]
        gkeys, gthr = [keys[i] for i in ix], [thresholds[i] for i in ix]
        goffs = [offs[i] for i in ix]
        if backend == "torch":
            values, starts = _reference.gather_dropped_many(
                group, gkeys, gthr, goffs, buffer=buffers.get(device)
            )
        else:
            sources = [t if t.is_contiguous() else t.contiguous() for t in group]
            values, starts = kernels.dispatch(backend, device).gather_dropped_many(
                sources, gkeys, gthr, goffs
            )
        groups.append(_Group(backend, group, gkeys, gthr, goffs, values, starts))
    return DroppedValues._of_groups(groups)


def save_dropped(
    tensor: torch.Tensor,
    key: int,
    threshold: int,
    buffer: torch.Tensor | None = None,
    offset: int = 0,
) -> DroppedValues:
    """:func:`save_dropped_many` of one tensor."""
    return save_dropped_many([tensor], [key], [threshold], [check_offset(offset)], buffer)


def mask_and_save_dropped_many(
    grads: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
) -> DroppedValues:
    """:func:`mask_` of ``grads``, then :func:`save_dropped_many` of ``tensors``, in fewer passes.

    Full update drop's step: ``tensors[i]`` is the parameter (or piece) whose gradient is
    ``grads[i]``, so its dropped elements are the gradient's (same key, threshold, offset and
    size). Where both go to the C++ kernel (contiguous CPU tensors of one element size), one
    ``hf_dropgrad::mask_gather_dropped_`` call per parameter dtype masks the gradients and packs
    the parameters' dropped values from the same hashes: two passes over the stream per step
    (mask and pack, restore) instead of four. Everything else takes :func:`mask_` and
    :func:`save_dropped_many`. The result equals theirs bit for bit.
    """
    n = check_lengths(grads, keys, thresholds, scales)
    if len(tensors) != n:
        raise ValueError(f"grads and tensors differ in length: {n}, {len(tensors)}")
    offs = check_offsets(offsets, n)
    requested = kernels.requested_backend()
    fused: dict[torch.dtype, list[int]] = {}
    rest: list[int] = []
    for i, (grad, tensor) in enumerate(zip(grads, tensors)):
        if (
            thresholds[i] > 0
            and grad.device.type == "cpu"
            and tensor.device == grad.device
            and grad.numel() == tensor.numel()
            and grad.element_size() == tensor.element_size()
            and grad.is_contiguous()
            and tensor.is_contiguous()
            and kernels.choose(grad, "mask", requested) == "cpp"
            and kernels.choose(tensor, "pack", requested) == "cpp"
            and kernels.dispatch("cpp", grad.device) is kernels.ops
        ):
            fused.setdefault(tensor.dtype, []).append(i)
        else:
            rest.append(i)
    groups = []
    for ix in fused.values():
        gkeys, gthr = [keys[i] for i in ix], [thresholds[i] for i in ix]
        goffs = [offs[i] for i in ix]
        group = [tensors[i] for i in ix]
        values, starts = kernels.ops.mask_gather_dropped_(
            [grads[i] for i in ix], group, gkeys, gthr, [scales[i] for i in ix], goffs
        )
        groups.append(_Group("cpp", group, gkeys, gthr, goffs, values, starts))
    if rest:
        mask_(
            [grads[i] for i in rest],
            [keys[i] for i in rest],
            [thresholds[i] for i in rest],
            [scales[i] for i in rest],
            [offs[i] for i in rest],
        )
        saved = save_dropped_many(
            [tensors[i] for i in rest],
            [keys[i] for i in rest],
            [thresholds[i] for i in rest],
            [offs[i] for i in rest],
        )
        groups.extend(saved._groups)
    return DroppedValues._of_groups(groups)

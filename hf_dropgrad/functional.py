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
decisions of those elements of the full parameter (what sharded engines need); and, optionally,
its runs (``runs[i]`` elements per run, ``strides[i]`` stream elements between run starts), so
a column shard, whose rows are runs of the full parameter, gets its elements' decisions too
(what tensor parallel needs; see :mod:`hf_dropgrad.kernels.checks`).

Two paths follow torch.optim's single-tensor / multi-tensor pattern: :func:`mask_reference_`
(pure torch, any device, the test oracle) and :func:`mask_` (the ``hf_dropgrad::mask_`` torch
op: C++ on CPU, Triton on CUDA). Each tensor's backend is a
:class:`~hf_dropgrad.kernels.protocol.Plan` from :func:`hf_dropgrad.kernels.choose`, which
alone reads ``HF_DROPGRAD_BACKEND``; every plan's module offers the same functions, so nothing
here names a backend. They agree bit for bit. Full update drop's :func:`save_dropped_many` /
:meth:`DroppedValues.restore` go the same way, one call per plan, device and dtype for all the
tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from hf_dropgrad import kernels
from hf_dropgrad.kernels.checks import check_lengths, check_offset, check_offsets, check_runs
from hf_dropgrad.kernels.protocol import Plan
from hf_dropgrad.kernels.reference import keep_mask as _keep_mask_reference
from hf_dropgrad.kernels.reference import mask_tensor_ as _mask_tensor_reference
from hf_dropgrad.kernels.reference import random_bits as _random_bits
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
    "keep_factor",
    "mask_and_save_dropped_many",
    "mask_",
    "masked",
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
random_bits = _random_bits
#: Boolean keep decisions of elements ``offset .. offset + numel - 1`` (pure torch).
keep_mask_reference = _keep_mask_reference
#: Mask one gradient in place, span by span: the single-tensor reference path, any device.
#: ``float(g) * factor`` is rounded once to the gradient's dtype, as the fused kernels do.
mask_reference_ = _mask_tensor_reference


def _places(
    tensors: Sequence[torch.Tensor],
    offsets: Sequence[int] | None,
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
) -> tuple[list[int], list[int], list[int]]:
    offs = check_offsets(offsets, len(tensors))
    rs, ss = check_runs([t.numel() for t in tensors], offs, runs, strides)
    return offs, rs, ss


def _contiguous(plan: Plan, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    # The fused backends take contiguous tensors: a non-contiguous one goes through a copy.
    if not plan.fused:
        return tensors
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _copy_back(targets: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
    for target, tensor in zip(targets, tensors):
        if target is not tensor:
            tensor.copy_(target)


def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
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
        runs, strides: where each gradient's runs sit (default: each gradient one run):
            ``grads[i]`` holds ``numel // runs[i]`` runs of ``runs[i]`` stream elements, run
            ``r`` starting at ``offsets[i] + r * strides[i]``. A column shard ``w[:, a:b]`` of
            a ``(rows, cols)`` weight is ``offsets=[a], runs=[b - a], strides=[cols]``.

    Each gradient goes to the plan :func:`hf_dropgrad.kernels.choose` picks; the gradients of
    one plan and device go in one call (the ``hf_dropgrad::mask_`` op: one parallel pass of
    the C++ kernel on CPU, one Triton launch per dtype on CUDA), the rest through the reference.
    Non-contiguous gradients are masked through a contiguous copy by the fused backends. No
    host-device synchronisation. ``torch.compile(fullgraph=True)`` traces it as one op per
    group.
    """
    check_lengths(grads, keys, thresholds, scales)
    offs, rs, ss = _places(grads, offsets, runs, strides)
    requested = kernels.requested_backend()  # once per call, not once per gradient
    plans = [kernels.choose(g, "mask", requested) if t > 0 else None
             for g, t in zip(grads, thresholds)]
    _mask_planned(plans, grads, keys, thresholds, scales, offs, rs, ss)


def _mask_planned(
    plans: Sequence[Plan | None],
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offs: Sequence[int],
    rs: Sequence[int],
    ss: Sequence[int],
) -> None:
    """:func:`mask_` with each gradient's plan chosen (``None``: not masked)."""
    # Keyed by the backend's name, not the plan (torch.compile cannot hash a module): on one
    # device a name stands for one plan.
    groups: dict[tuple[str, torch.device], tuple[Plan, list[int]]] = {}
    for i, plan in enumerate(plans):
        if plan is not None:
            groups.setdefault((plan.backend, grads[i].device), (plan, []))[1].append(i)
    for plan, index in groups.values():
        originals = [grads[i] for i in index]
        tensors = _contiguous(plan, originals)
        plan.ops.mask_(
            tensors,
            [keys[i] for i in index],
            [thresholds[i] for i in index],
            [scales[i] for i in index],
            [offs[i] for i in index],
            [rs[i] for i in index],
            [ss[i] for i in index],
        )
        _copy_back(tensors, originals)


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

    Made by the plan :func:`hf_dropgrad.kernels.choose` picks for the output (the
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
    if numel:
        kernels.choose(out, "keep").ops.keep_mask_(out, key, threshold, offset)
    return out


def keep_factor(
    grad: torch.Tensor, key: int, threshold: int, scale: float, *, offset: int = 0
) -> torch.Tensor:
    """The factor :func:`mask_` multiplies each element of ``grad`` by: ``scale`` where the
    element is kept, ``0`` where it is dropped, in the compute dtype (``float64`` for a
    ``float64`` gradient, else ``float32``), shaped like ``grad``.

    ``grad`` gives the shape, device and dtype only (its elements are stream elements
    ``offset ..``, one run).
    """
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    keep = keep_mask(grad.numel(), key, threshold, grad.device, offset=offset)
    return keep.view(grad.shape).to(compute).mul_(scale)


def masked(
    grad: torch.Tensor, key: int, threshold: int, scale: float, *, offset: int = 0
) -> torch.Tensor:
    """``grad`` masked out of place, through autograd: ``grad * factor`` with the
    :func:`keep_factor` of ``(key, threshold, scale)``.

    The values are bit-identical to :func:`mask_` of a copy (``float(g) * factor`` rounded once
    to ``grad.dtype``), and when ``grad`` requires grad the result's derivative with respect to
    it is the factor (mask times scale): what a differentiable optimizer step
    (``differentiable=True``) needs. ``grad`` itself is not modified.
    """
    factor = keep_factor(grad, key, threshold, scale, offset=offset)
    if grad.dtype == factor.dtype:
        return grad * factor
    return (factor * grad).to(grad.dtype)


class _Group(NamedTuple):
    """Tensors of one plan, device and dtype, saved by one call."""

    plan: Plan
    tensors: list[torch.Tensor]
    keys: list[int]
    thresholds: list[int]
    offsets: list[int]
    runs: list[int]
    strides: list[int]
    values: torch.Tensor
    starts: torch.Tensor


class DroppedValues:
    """The values of the dropped elements of tensors, saved by :func:`save_dropped_many`.

    Holds ``p * numel`` values of each tensor's dtype (plus one int64 per 4096-element chunk);
    :meth:`restore` writes them back. Built by :func:`save_dropped_many`, or by hand for one
    tensor from the values and chunk starts of a ``gather_dropped_many`` call of ``backend``
    (``"cpp"``, ``"triton"`` or ``"torch"``), which must hold as many values as ``starts``
    says (checked here, on the host).
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
        run: int | None = None,
        stride: int | None = None,
    ) -> None:
        (offset,), (run,), (stride,) = _places(
            [tensor], [offset], None if run is None else [run],
            None if stride is None else [stride],
        )
        if starts.numel() == 0 or int(starts[-1]) != values.numel():
            raise ValueError(
                f"values must hold the {int(starts[-1]) if starts.numel() else '?'} values its "
                f"starts count, got {values.numel()}"
            )
        plan = kernels.plan_of(backend, tensor.device)
        self._groups = [
            _Group(plan, [tensor], [key], [threshold], [offset], [run], [stride], values, starts)
        ]

    @classmethod
    def _of_groups(cls, groups: list[_Group]) -> DroppedValues:
        out = cls.__new__(cls)
        out._groups = groups
        return out

    @classmethod
    def join(cls, *parts: DroppedValues) -> DroppedValues:
        """The values of several saves as one: :meth:`restore` restores them all."""
        return cls._of_groups([g for part in parts for g in part._groups])

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
        return [g.plan.backend for g in self._groups for _ in g.tensors]

    @property
    def backend(self) -> str:
        """The backend that saved the values (of a :func:`save_dropped` of one tensor)."""
        (backend,) = self.backends
        return backend

    def restore(self, buffer: torch.Tensor | None = None) -> None:
        """Write the saved values back into the dropped elements; kept elements are untouched.

        ``buffer`` is accepted for compatibility and unused: the reference path works in spans
        and needs no full-size mask.
        """
        for g in self._groups:
            targets = _contiguous(g.plan, g.tensors)
            g.plan.ops.scatter_dropped_many(
                targets, g.keys, g.thresholds, g.offsets, g.runs, g.strides, g.values, g.starts
            )
            _copy_back(targets, g.tensors)


def needs_mask_buffer(tensor: torch.Tensor) -> bool:
    """Whether :func:`save_dropped` / :meth:`DroppedValues.restore` of ``tensor`` take the
    reference path, which builds its masks span by span (the fused backends build none)."""
    return not kernels.choose(tensor, "pack").fused


def save_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int] | None = None,
    buffer: torch.Tensor | None = None,
    *,
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> DroppedValues:
    """Save the values of the elements of every tensor that its stream ``(key, threshold)`` drops.

    ``tensors[i]`` holds stream elements from ``offsets[i]`` on (default 0), in runs as
    :func:`mask_` says. Full update drop's memory: only the dropped values are kept (``p``
    times the tensors' bytes, plus 8 bytes per 4096 elements). The plan of each tensor is
    chosen once, here, by :func:`hf_dropgrad.kernels.choose`; the tensors of one plan, device
    and dtype are saved by one call (``hf_dropgrad::gather_dropped_many``: on CPU one counting
    and one packing pass over all of them, in parallel, with no full-size mask). ``buffer`` is
    accepted for compatibility and unused.
    """
    n = len(tensors)
    if not len(keys) == len(thresholds) == n:
        raise ValueError(
            f"tensors, keys and thresholds differ in length: {n}, {len(keys)}, {len(thresholds)}"
        )
    offs, rs, ss = _places(tensors, offsets, runs, strides)
    requested = kernels.requested_backend()
    plans = [kernels.choose(tensor, "pack", requested) for tensor in tensors]
    return DroppedValues._of_groups(
        _save_planned(plans, tensors, keys, thresholds, offs, rs, ss)
    )


def _save_planned(
    plans: Sequence[Plan],
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offs: Sequence[int],
    rs: Sequence[int],
    ss: Sequence[int],
) -> list[_Group]:
    """:func:`save_dropped_many`'s groups, with each tensor's plan chosen."""
    index: dict[tuple[str, torch.device, torch.dtype], tuple[Plan, list[int]]] = {}
    for i, (plan, tensor) in enumerate(zip(plans, tensors)):
        index.setdefault((plan.backend, tensor.device, tensor.dtype), (plan, []))[1].append(i)
    groups = []
    for plan, ix in index.values():
        group = [tensors[i] for i in ix]
        gkeys, gthr = [keys[i] for i in ix], [thresholds[i] for i in ix]
        goffs, gruns, gstrides = [offs[i] for i in ix], [rs[i] for i in ix], [ss[i] for i in ix]
        values, starts = plan.ops.gather_dropped_many(
            _contiguous(plan, group), gkeys, gthr, goffs, gruns, gstrides
        )
        groups.append(_Group(plan, group, gkeys, gthr, goffs, gruns, gstrides, values, starts))
    return groups


def save_dropped(
    tensor: torch.Tensor,
    key: int,
    threshold: int,
    buffer: torch.Tensor | None = None,
    offset: int = 0,
) -> DroppedValues:
    """:func:`save_dropped_many` of one tensor."""
    return save_dropped_many([tensor], [key], [threshold], [check_offset(offset)])


def mask_and_save_dropped_many(
    grads: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> DroppedValues:
    """:func:`mask_` of ``grads``, then :func:`save_dropped_many` of ``tensors``, in fewer passes.

    Full update drop's step: ``tensors[i]`` is the parameter (or piece) whose gradient is
    ``grads[i]``, so its dropped elements are the gradient's (same key, threshold, place and
    size). Where a gradient and its tensor share a plan and an element size, one
    ``mask_gather_dropped_`` call per plan, device and tensor dtype does both (the C++ kernel
    in one hashing pass: two passes over the stream per step with the restore, instead of
    four). Everything else takes :func:`mask_` and :func:`save_dropped_many`. The result equals
    theirs bit for bit.
    """
    n = check_lengths(grads, keys, thresholds, scales)
    if len(tensors) != n:
        raise ValueError(f"grads and tensors differ in length: {n}, {len(tensors)}")
    offs, rs, ss = _places(grads, offsets, runs, strides)
    requested = kernels.requested_backend()
    paired: dict[tuple[str, torch.device, torch.dtype], tuple[Plan, list[int]]] = {}
    rest: list[int] = []
    mask_plans: list[Plan | None] = []
    pack_plans: list[Plan] = []
    for i, (grad, tensor) in enumerate(zip(grads, tensors)):
        mask_plan = kernels.choose(grad, "mask", requested) if thresholds[i] > 0 else None
        pack_plan = kernels.choose(tensor, "pack", requested)
        if (
            mask_plan is not None
            and mask_plan.fused
            and mask_plan == pack_plan
            and grad.numel() == tensor.numel()
            and grad.element_size() == tensor.element_size()
            and grad.is_contiguous()
            and tensor.device == grad.device
        ):
            key = (pack_plan.backend, tensor.device, tensor.dtype)
            paired.setdefault(key, (pack_plan, []))[1].append(i)
        else:
            rest.append(i)
        mask_plans.append(mask_plan)
        pack_plans.append(pack_plan)
    groups = []
    for plan, ix in paired.values():
        gkeys, gthr = [keys[i] for i in ix], [thresholds[i] for i in ix]
        goffs, gruns, gstrides = [offs[i] for i in ix], [rs[i] for i in ix], [ss[i] for i in ix]
        group = [tensors[i] for i in ix]
        values, starts = plan.ops.mask_gather_dropped_(
            [grads[i] for i in ix], group, gkeys, gthr, [scales[i] for i in ix], goffs, gruns,
            gstrides,
        )
        groups.append(_Group(plan, group, gkeys, gthr, goffs, gruns, gstrides, values, starts))
    if rest:
        def pick(values: Sequence) -> list:
            return [values[i] for i in rest]

        _mask_planned(pick(mask_plans), pick(grads), pick(keys), pick(thresholds), pick(scales),
                      pick(offs), pick(rs), pick(ss))
        groups += _save_planned(pick(pack_plans), pick(tensors), pick(keys), pick(thresholds),
                                pick(offs), pick(rs), pick(ss))
    return DroppedValues._of_groups(groups)

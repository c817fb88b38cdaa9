"""Where the elements :class:`~hf_dropgrad.optimizer.DropGrad` masks sit in the full parameters.

The mask of element ``e`` of a parameter depends only on ``(seed, step, parameter position,
e)``, where ``e`` is the element's index in the **full, unsharded** parameter (flattened, row
major). A sharded engine gives each process some of a parameter's elements: contiguous runs
(FSDP2's ``Shard(0)``, DeepSpeed ZeRO's partitions) or a strided box of them (tensor
parallel's ``Shard(1)``: a run per row). Masking each local tensor with its parameter's key and
the full-tensor indices of its elements draws exactly the elements of the full mask it holds,
so the union over processes is the mask of a 1-process run.

This module holds the small public objects through which the engines' integrations
(:mod:`hf_dropgrad.integrations`) tell the core where those elements are, without the core
knowing any engine:

* :class:`Box`: a contiguous local tensor and where its elements sit: ``numel // run`` runs of
  ``run`` consecutive full-tensor indices, run ``r`` from ``offset + r * stride`` (one run
  when ``run`` is ``None``);
* :class:`Local`: what DropGrad masks for one parameter in this process: the boxes of its
  values (full update drop saves and restores them) and, at masking time, of its gradient
  (which may be placed differently from the values);
* :class:`Piece`: the common case of a :class:`Local`, one box of values whose gradient sits
  where the values do;
* :class:`Segment` and :class:`FlatLayout`: runs of flat tensors an engine steps in place of
  the parameters (DeepSpeed ZeRO's partitions), mapped back to parameter elements; an
  integration builds one and hands it to :meth:`DropGrad.set_layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "Box",
    "FlatLayout",
    "Local",
    "Piece",
    "Segment",
    "Whole",
    "local_target",
    "register_sharded",
]


@dataclass(frozen=True)
class Box:
    """A contiguous local tensor and the full-parameter indices of its elements.

    Element ``j`` of ``tensor`` (flattened) is element ``offset + (j // run) * stride + j %
    run`` of the full parameter; ``run=None`` means one run (``offset + j``).
    """

    tensor: torch.Tensor
    offset: int = 0
    run: int | None = None
    stride: int = 0

    @property
    def place(self) -> tuple[int, int, int]:
        """``(offset, run, stride)`` with the run resolved (what the kernels take)."""
        numel = self.tensor.numel()
        run = numel if self.run is None else self.run
        return self.offset, run, self.stride if numel > run else run

    def __repr__(self) -> str:
        run = "" if self.run is None else f", run={self.run}, stride={self.stride}"
        return f"Box(numel={self.tensor.numel()}, offset={self.offset}{run})"


@runtime_checkable
class Local(Protocol):
    """What DropGrad masks for one parameter in this process."""

    def values(self) -> Sequence[Box]:
        """The boxes of the parameter's local values (what a step updates in place)."""

    def grads(self) -> Sequence[Box] | None:
        """The boxes of its local gradient, read at masking time, or ``None`` without one."""


@dataclass(frozen=True)
class Whole:
    """A plain (unsharded) parameter: one box at offset 0, values and gradient alike."""

    param: torch.Tensor

    def values(self) -> tuple[Box, ...]:
        return (Box(self.param.detach()),)

    def grads(self) -> tuple[Box, ...] | None:
        grad = self.param.grad
        return None if grad is None else (Box(grad),)


@dataclass(frozen=True)
class Piece:
    """A contiguous run (or a box of runs) of a parameter's elements held by this process, its
    gradient placed alike.

    Args:
        data: the values (a contiguous view the step updates in place).
        offset: global flat index of ``data``'s first element in the full parameter.
        grad_of: returns the gradient of ``data`` (same shape) or ``None``; called at masking
            time, so a closure's fresh gradients are the ones masked.
        run, stride: ``data`` holds runs of ``run`` elements, ``stride`` apart in the full
            parameter (default: one run).
    """

    data: torch.Tensor
    offset: int
    grad_of: Callable[[], torch.Tensor | None]
    run: int | None = None
    stride: int = 0

    @property
    def grad(self) -> torch.Tensor | None:
        return self.grad_of()

    def values(self) -> tuple[Box, ...]:
        return (Box(self.data, self.offset, self.run, self.stride),)

    def grads(self) -> tuple[Box, ...] | None:
        grad = self.grad_of()
        return None if grad is None else (Box(grad, self.offset, self.run, self.stride),)

    def __repr__(self) -> str:
        run = "" if self.run is None else f", run={self.run}, stride={self.stride}"
        return f"Piece(numel={self.data.numel()}, offset={self.offset}{run})"


_SHARDED: list[Callable[[Any, str | int | None], Local | None]] = []


def register_sharded(local_of: Callable[[Any, str | int | None], Local | None]) -> None:
    """Teach :func:`local_target` a kind of sharded parameter.

    ``local_of(p, name)`` returns the :class:`Local` of a parameter it knows (raising, with
    ``name`` in the message, if it cannot be masked exactly), ``None`` for others.
    :mod:`hf_dropgrad.integrations.dtensor` registers DTensor parameters (FSDP2, tensor
    parallel, N-D meshes) and :mod:`hf_dropgrad.integrations.fsdp` FSDP1's refusal when the
    package is imported, so the core needs no import of them.
    """
    if local_of not in _SHARDED:
        _SHARDED.append(local_of)


def local_target(p: torch.Tensor, name: str | int | None = None) -> Local:
    """What DropGrad masks for parameter ``p`` (called ``name`` in messages): its local share
    from the first :func:`register_sharded` handler that knows ``p``, else ``p`` whole."""
    for local_of in _SHARDED:
        local = local_of(p, name)
        if local is not None:
            return local
    return Whole(p)


@dataclass(frozen=True)
class Segment:
    """``flat[start : start + numel]`` holds elements ``offset : offset + numel`` of the
    parameter at ``position`` (its place in the optimizer's ``param_groups``)."""

    start: int
    numel: int
    position: int
    offset: int


class FlatLayout:
    """Where each parameter's share sits in the flat tensors an engine steps instead of them.

    ``segments[id(flat)]`` lists the :class:`Segment` runs of the flat tensor ``flat``. The
    engine keeps the flat tensors for the whole run and may call ``step()`` with only some of
    them in ``param_groups``: the pieces of a step are those of the flat tensors present then.

    Args:
        segments: ``{id(flat tensor): [Segment, ...]}``.
        engine: a label for messages (e.g. ``"DeepSpeed ZeRO-2"``).
    """

    def __init__(self, segments: Mapping[int, Sequence[Segment]], engine: str = "engine") -> None:
        self.segments = {key: tuple(runs) for key, runs in segments.items()}
        self.engine = engine

    def pieces(self, param_groups: Iterable[dict[str, Any]]) -> Iterator[tuple[int, Piece]]:
        """``(parameter position, Piece)`` of every run of the flat tensors in ``param_groups``."""
        for group in param_groups:
            for flat in group["params"]:
                runs = self.segments.get(id(flat))
                if runs is None:
                    raise RuntimeError(
                        f"DropGrad under {self.engine} was handed a tensor that is not one of "
                        "its flat partitions; cannot place its mask"
                    )
                for run in runs:
                    data = flat.detach().narrow(0, run.start, run.numel)
                    yield run.position, Piece(data, run.offset, _narrow_grad(flat, run))


def _narrow_grad(flat: torch.Tensor, run: Segment) -> Callable[[], torch.Tensor | None]:
    def grad_of() -> torch.Tensor | None:
        grad = flat.grad
        return None if grad is None else grad.narrow(0, run.start, run.numel)

    return grad_of

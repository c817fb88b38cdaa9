"""Where the elements :class:`~hf_dropgrad.optimizer.DropGrad` masks sit in the full parameters.

The mask of element ``e`` of a parameter depends only on ``(seed, step, parameter position,
e)``, where ``e`` is the element's index in the **full, unsharded** parameter. A sharded
engine gives each process contiguous runs of a parameter's elements; masking a run with its
parameter's key and the run's global offset draws exactly the elements of the full mask the
run holds, so the union over processes is the mask of a 1-process run.

This module holds the two small public objects through which the engines' integrations
(:mod:`hf_dropgrad.integrations`) tell the core where those runs are, without the core
knowing any engine:

* :class:`Piece`: a run this process masks (its data, its gradient, its global offset);
* :class:`Segment` and :class:`FlatLayout`: runs of flat tensors an engine steps in place of
  the parameters (DeepSpeed ZeRO's partitions), mapped back to parameter elements; an
  integration builds one and hands it to :meth:`DropGrad.set_layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "FlatLayout",
    "Piece",
    "Segment",
    "Target",
    "data_of",
    "local_target",
    "offset_of",
    "register_sharded",
]


@dataclass(frozen=True)
class Piece:
    """A contiguous run of a parameter's elements held by this process.

    Args:
        data: the run's values (a contiguous view the step updates in place).
        offset: global flat index of ``data``'s first element in the full parameter.
        grad_of: returns the run's gradient (same shape as ``data``) or ``None``; called at
            masking time, so a closure's fresh gradients are the ones masked.
    """

    data: torch.Tensor
    offset: int
    grad_of: Callable[[], torch.Tensor | None]

    @property
    def grad(self) -> torch.Tensor | None:
        return self.grad_of()

    def __repr__(self) -> str:
        return f"Piece(numel={self.data.numel()}, offset={self.offset})"


#: What DropGrad masks: a parameter (its ``.grad``) or a :class:`Piece` of one.
Target = torch.Tensor | Piece


def offset_of(target: Target) -> int:
    """Global element offset of a masking target (a plain parameter starts at 0)."""
    return target.offset if isinstance(target, Piece) else 0


def data_of(target: Target) -> torch.Tensor:
    """The values a target's step updates (a parameter's detached data or a piece's run)."""
    return target.data if isinstance(target, Piece) else target.detach()


_SHARDED: list[Callable[[Any], Piece | None]] = []


def register_sharded(local_piece: Callable[[Any], Piece | None]) -> None:
    """Teach :func:`local_target` a kind of sharded parameter.

    ``local_piece(p)`` returns the local :class:`Piece` of a parameter it knows (raising if it
    cannot be masked exactly), ``None`` for others. :mod:`hf_dropgrad.integrations.fsdp`
    registers FSDP2's ``DTensor`` (and FSDP1's refusal) when the package is imported, so the
    core needs no import of it.
    """
    if local_piece not in _SHARDED:
        _SHARDED.append(local_piece)


def local_target(p: torch.Tensor) -> Target:
    """What DropGrad masks for parameter ``p``: ``p`` itself, or its local shard as a Piece
    (from the first :func:`register_sharded` handler that knows ``p``)."""
    for local_piece in _SHARDED:
        piece = local_piece(p)
        if piece is not None:
            return piece
    return p


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

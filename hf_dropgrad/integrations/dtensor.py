"""DTensor parameters (FSDP2, tensor parallel, N-D meshes): which full-tensor elements a process
holds.

A ``DTensor``'s local tensor holds the elements of the full tensor that its placements give this
process's mesh coordinate. Every placement a user reaches with public torch and transformers
APIs splits one tensor dimension at a time, so the set is a box: along each dimension, a list of
index intervals (one for ``Shard(d)``, several for a ``_StridedShard`` that is not contiguous),
the product over dimensions in row-major order. :func:`index_map` computes those intervals with
the placements' own splitting code, applied left to right over the mesh dimensions as DTensor
does (``_StridedShard``, FSDP2 over TP, included), on a 1-D index vector per dimension, so it
costs a few small tensors per parameter, once (cached by shape, placements and coordinate).

The box is then cut into :class:`~hf_dropgrad.layout.Box` es: a local contiguous range whose
elements are runs of full-tensor indices, a fixed stride apart. The usual layouts are one box:

==============================================  ==========================================
placements (mesh)                               local tensor of a ``(rows, cols)`` weight
==============================================  ==========================================
``Shard(0)`` (FSDP2, ``ColwiseParallel``)       one run: ``offset = first row * cols``
``Shard(1)`` (``RowwiseParallel``)              ``rows`` runs of ``cols / n``, stride ``cols``
``(_StridedShard(0, sf), Shard(0))`` (FSDP+TP)  one run (the TP shard's FSDP rows)
``(Shard(0), Shard(1))`` (FSDP2 over TP)        a run per local row, stride ``cols``
``Replicate``, ``Partial`` (any mesh dim)       as if that mesh dim were absent
==============================================  ==========================================

A ``Partial`` gradient is masked like a replicated one: each rank's partial sum gets the same
mask, so the sum is masked (the dropped elements exactly; the kept ones within float rounding of
scaling the sum). A gradient is always masked by its own placements, which may differ from its
parameter's (a ``Replicate`` gradient of a ``Shard`` parameter): each of its elements gets the
mask of its full-tensor index, so whatever redistribution the optimizer does sees the masked
values. Full update drop saves the values by the parameter's placements.

Checked against torch 2.13 (:data:`CHECKED_AGAINST`): ``DTensor._local_tensor``, ``_spec``, the
private ``_StridedShard`` and ``Shard._split_tensor``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_dropgrad.layout import Box, register_sharded

__all__ = [
    "CHECKED_AGAINST",
    "DTensorLocal",
    "boxes_of",
    "check_placements",
    "index_map",
    "is_dtensor",
    "local_of",
]

#: The torch version whose DTensor internals this module reads.
CHECKED_AGAINST = "torch 2.13"

#: Per tensor dimension, the full-tensor index intervals ``(start, length)`` a process holds, in
#: local order.
Intervals = tuple[tuple[tuple[int, int], ...], ...]


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def _kind(placement: Any) -> str:
    """``"shard"`` (split along ``placement.dim``), ``"same"`` (every rank holds the whole
    local tensor: ``Replicate``, ``Partial``), or ``"unknown"``."""
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

    if isinstance(placement, Shard) or (
        type(placement).__name__ == "_StridedShard" and hasattr(placement, "dim")
    ):
        return "shard"
    if isinstance(placement, Replicate | Partial):
        return "same"
    return "unknown"


def check_placements(placements: Sequence[Any], what: str) -> None:
    """Raise a ``ValueError`` naming ``what`` if a placement is one DropGrad does not know."""
    for placement in placements:
        if _kind(placement) == "unknown":
            raise ValueError(
                f"DropGrad cannot place the mask of {what}: it is placed {tuple(placements)}, "
                f"and {placement!r} is neither a Shard, a _StridedShard, Replicate nor Partial. "
                "Leave this parameter without a rate (e.g. --dropgrad_module_rates with a "
                "pattern that excludes it), or shard it with fully_shard / parallelize_module."
            )


def _split(placement: Any, index: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Part ``k`` of ``n`` of the 1-D ``index`` as ``placement`` splits its dimension."""
    one_dim = type(placement)(0) if type(placement).__name__ != "_StridedShard" else (
        type(placement)(0, split_factor=placement.split_factor)
    )
    parts, _ = one_dim._split_tensor(index, n, with_padding=False, contiguous=True)
    return parts[k] if k < len(parts) else index[:0]


def _intervals(index: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """``index`` (increasing runs of consecutive ints) as ``(start, length)`` intervals."""
    if index.numel() == 0:
        return ()
    values = index.tolist()
    out = []
    start, length = values[0], 1
    for v in values[1:]:
        if v == start + length:
            length += 1
        else:
            out.append((start, length))
            start, length = v, 1
    out.append((start, length))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def index_map(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: tuple[int, ...],
    placements: tuple[Any, ...],
) -> Intervals:
    """The full-tensor index intervals, per dimension, that mesh coordinate ``coordinate``
    holds of a tensor of ``shape`` placed ``placements`` on a mesh of ``mesh_shape``."""
    index = [torch.arange(size, dtype=torch.int64) for size in shape]
    for mesh_dim, placement in enumerate(placements):
        if _kind(placement) != "shard":
            continue
        d = placement.dim % len(shape) if shape else 0
        index[d] = _split(placement, index[d], mesh_shape[mesh_dim], coordinate[mesh_dim])
    return tuple(_intervals(i) for i in index)


@dataclass(frozen=True)
class _Cut:
    """One :class:`Box` of a local tensor: local elements ``[start, start + rows * run)``."""

    start: int
    rows: int
    run: int
    offset: int
    stride: int


@functools.lru_cache(maxsize=4096)
def _cuts(shape: tuple[int, ...], intervals: Intervals) -> tuple[_Cut, ...]:
    """The boxes of a local tensor holding ``intervals`` of a tensor of ``shape``."""
    numel = math.prod(shape)
    full = [ivs == ((0, size),) or size == 0 for ivs, size in zip(intervals, shape)]
    if all(full):
        return (_Cut(0, 1, numel, 0, numel),) if numel else ()
    q = max(d for d, f in enumerate(full) if not f)  # the innermost dimension not held whole
    inner = math.prod(shape[q + 1:])
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    # The common case: one interval on q and on the outermost dimension, every dimension in
    # between held whole: rows over dims 0..q-1 are a fixed stride apart.
    if len(intervals[q]) == 1 and (q == 0 or (len(intervals[0]) == 1 and all(full[1:q]))):
        (a, length), = intervals[q]
        if q == 0:
            return (_Cut(0, 1, length * inner, a * inner, length * inner),)
        (a0, n0), = intervals[0]
        rows = n0 * math.prod(shape[1:q])
        return (_Cut(0, rows, length * inner, a0 * strides[0] + a * strides[q], strides[q - 1]),)
    # Anything else: every run in local order, runs of equal length and stride merged.
    runs: list[tuple[int, int]] = []  # (offset, length) of each run

    def walk(d: int, base: int) -> None:
        if d == q:
            for a, length in intervals[q]:
                runs.append((base + a * strides[q], length * inner))
            return
        for a, length in intervals[d]:
            for i in range(a, a + length):
                walk(d + 1, base + i * strides[d])

    walk(0, 0)
    cuts: list[_Cut] = []
    start = 0
    for offset, length in runs:
        last = cuts[-1] if cuts else None
        if last is not None and last.run == length:
            stride = offset - last.offset if last.rows == 1 else last.stride
            if stride >= length and offset == last.offset + last.rows * stride:
                cuts[-1] = _Cut(last.start, last.rows + 1, length, last.offset, stride)
                start += length
                continue
        cuts.append(_Cut(start, 1, length, offset, length))
        start += length
    return tuple(cuts)


def boxes_of(local: torch.Tensor, shape: tuple[int, ...], mesh: Any, placements: Sequence[Any],
             what: str) -> tuple[Box, ...]:
    """The :class:`~hf_dropgrad.layout.Box` es of ``local``, this process's tensor of a DTensor
    of ``shape`` placed ``placements`` on ``mesh``.

    Raises:
        ValueError: naming ``what``, for an unknown placement or a local tensor whose shape is
            not the one the placements give (padding, a layout DropGrad does not know).
    """
    check_placements(placements, what)
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds nothing
        return ()
    intervals = index_map(tuple(shape), tuple(mesh.shape), tuple(coordinate), tuple(placements))
    want = tuple(sum(length for _, length in ivs) for ivs in intervals)
    if tuple(local.shape) != want:
        raise ValueError(
            f"DropGrad: the local tensor of {what} has shape {tuple(local.shape)}, not the "
            f"{want} its placements {tuple(placements)} give this rank; cannot place its mask"
        )
    cuts = _cuts(tuple(shape), intervals)
    if len(cuts) > 1 and not local.is_contiguous():
        raise ValueError(
            f"DropGrad: the local tensor of {what} is not contiguous and its elements form "
            f"{len(cuts)} boxes of the full tensor; cannot place its mask in place"
        )
    flat = local.reshape(-1) if len(cuts) > 1 else local
    out = []
    for cut in cuts:
        tensor = flat[cut.start : cut.start + cut.rows * cut.run] if len(cuts) > 1 else flat
        out.append(Box(tensor, cut.offset, cut.run if cut.rows > 1 else None,
                       cut.stride if cut.rows > 1 else 0))
    return tuple(out)


@dataclass(frozen=True)
class DTensorLocal:
    """What DropGrad masks of the DTensor parameter ``param`` in this process (a
    :class:`~hf_dropgrad.layout.Local`): its local values by its placements, its gradient by
    the gradient's own."""

    param: Any
    name: str

    def values(self) -> tuple[Box, ...]:
        p = self.param
        return boxes_of(p._local_tensor, tuple(p.shape), p.device_mesh, p.placements, self.name)

    def grads(self) -> tuple[Box, ...] | None:
        grad = self.param.grad
        if grad is None:
            return None
        if not is_dtensor(grad):
            if tuple(grad.shape) == tuple(self.param._local_tensor.shape):
                # a plain local gradient (set by hand): placed as the values
                return tuple(
                    Box(g, b.offset, b.run, b.stride) for g, b in
                    zip(_like(grad, self.values()), self.values())
                )
            raise RuntimeError(
                f"DropGrad: the gradient of {self.name} is a plain tensor of shape "
                f"{tuple(grad.shape)}, neither the DTensor's local shape nor a DTensor; cannot "
                "place its mask"
            )
        return boxes_of(grad._local_tensor, tuple(grad.shape), grad.device_mesh, grad.placements,
                        f"the gradient of {self.name}")


def _like(grad: torch.Tensor, boxes: Sequence[Box]) -> list[torch.Tensor]:
    """``grad`` cut as the value boxes are cut (they are consecutive local ranges)."""
    if len(boxes) == 1:
        return [grad]
    flat, out, start = grad.reshape(-1), [], 0
    for box in boxes:
        out.append(flat[start : start + box.tensor.numel()])
        start += box.tensor.numel()
    return out


def local_of(p: Any, name: str | int | None = None) -> DTensorLocal | None:
    """The :class:`DTensorLocal` of a DTensor parameter (``None`` for anything else); ``name``
    (or position) names it in messages."""
    if not is_dtensor(p):
        return None
    return DTensorLocal(p, _label(name))


def _label(name: str | int | None) -> str:
    if name is None:
        return "a DTensor parameter"
    return f"parameter {name}" if isinstance(name, int) else f"parameter {name!r}"


register_sharded(local_of)  # hf_dropgrad/__init__.py imports this module

"""Argument checks and the chunk arithmetic shared by every masking backend.

Every backend function takes, for each tensor, where its elements sit in the stream: the
*offset* of its first element, and its *runs*. A tensor of ``numel`` elements with run length
``run`` and run stride ``stride`` holds ``numel // run`` runs of ``run`` consecutive stream
elements; run ``r`` (local elements ``r * run .. (r + 1) * run - 1``, row-major) starts at
stream element ``offset + r * stride``. ``run == numel`` (one run) is a contiguous slice of the
stream, the common case; several runs are, e.g., a column shard of a weight (tensor parallel's
``Shard(1)``: a run per row, ``stride`` the full row length). See docs/design.md, "Where the
elements sit".

The chunks a tensor touches are numbered run after run, each run's chunks in stream order; the
chunk starts of full update drop (``starts``) follow this numbering in every backend.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from hf_dropgrad.kernels.stream import CHUNK, RESOLUTION

__all__ = [
    "MAX_OFFSET",
    "Runs",
    "check_lengths",
    "check_offset",
    "check_offsets",
    "check_pairs",
    "check_runs",
    "check_threshold",
    "floor_sum",
    "num_chunks",
    "run_chunks",
]

#: Offsets (global element indices) stay below this, so ``offset + numel`` fits an int64 and the
#: counter ``chunk * 1024 + b`` of the stream cannot wrap.
MAX_OFFSET = 1 << 62

#: ``(runs, strides)`` of a list of tensors, one entry each.
Runs = tuple[list[int], list[int]]


def _as_int(value: object, name: str, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int ({what}), got bool")
    if not isinstance(value, int):
        try:
            value = operator.index(value)  # numpy / torch integer scalars
        except TypeError:
            raise TypeError(f"{name} must be an int ({what}), got {type(value).__name__}") from None
    return int(value)


def check_offset(offset: int, name: str = "offset") -> int:
    """``offset`` as an int in ``[0, 2**62)``, or a ``TypeError`` / ``ValueError`` naming it."""
    offset = _as_int(offset, name, "a global element index")
    if not 0 <= offset < MAX_OFFSET:
        raise ValueError(f"{name} must be in [0, 2**62), got {offset}")
    return offset


def check_offsets(offsets: Sequence[int] | None, n: int) -> list[int]:
    """One offset per tensor (``None``: all 0), each checked by :func:`check_offset`."""
    if offsets is None:
        return [0] * n
    if len(offsets) != n:
        raise ValueError(f"offsets must have one entry per tensor ({n}), got {len(offsets)}")
    return [check_offset(o, f"offsets[{i}]") for i, o in enumerate(offsets)]


def check_runs(
    numels: Sequence[int],
    offsets: Sequence[int],
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
) -> Runs:
    """One run length and stride per tensor (``None``: each tensor one run), checked.

    A run length divides the tensor's size (``0`` only for an empty tensor), and runs do not
    overlap (``stride >= run``); the last element stays below ``2**62``.
    """
    n = len(numels)
    if runs is None and strides is None:
        return list(numels), list(numels)
    if runs is None or strides is None:
        raise ValueError("runs and strides go together: give both or neither")
    if len(runs) != n or len(strides) != n:
        raise ValueError(
            f"runs and strides must have one entry per tensor ({n}), got {len(runs)} and "
            f"{len(strides)}"
        )
    out_runs, out_strides = [], []
    for i, (numel, offset) in enumerate(zip(numels, offsets)):
        run = _as_int(runs[i], f"runs[{i}]", "elements per run")
        stride = _as_int(strides[i], f"strides[{i}]", "stream elements between runs")
        if numel == 0:
            run, stride = 0, max(stride, 0)
        elif run <= 0 or numel % run:
            raise ValueError(f"runs[{i}] must divide the tensor's {numel} elements, got {run}")
        elif numel > run and stride < run:
            raise ValueError(
                f"strides[{i}] must be >= runs[{i}] ({run}) so runs do not overlap, got {stride}"
            )
        if numel and offset + (numel // run - 1) * stride + run > MAX_OFFSET:
            raise ValueError(f"tensor {i}'s last element lies past 2**62")
        out_runs.append(run)
        out_strides.append(stride)
    return out_runs, out_strides


def check_threshold(threshold: int, name: str = "threshold") -> int:
    """``threshold`` as an int in ``[0, 65536]``, or a ``ValueError`` naming it."""
    t = int(threshold)
    if not 0 <= t <= RESOLUTION:
        raise ValueError(f"{name} must be in [0, {RESOLUTION}], got {t}")
    return t


def check_lengths(grads: Sequence, keys: Sequence, thresholds: Sequence, scales: Sequence) -> int:
    """The number of tensors, or a ``ValueError`` if the four lists differ in length."""
    n = len(grads)
    if not len(keys) == len(thresholds) == len(scales) == n:
        raise ValueError(
            f"grads, keys, thresholds and scales differ in length: "
            f"{n}, {len(keys)}, {len(thresholds)}, {len(scales)}"
        )
    return n


def check_pairs(grads: Sequence, tensors: Sequence) -> None:
    """A ``ValueError`` unless ``tensors[i]`` has ``grads[i]``'s size, for every ``i`` (the
    parameters of ``mask_gather_dropped_``)."""
    if len(tensors) != len(grads):
        raise ValueError(f"grads and tensors differ in length: {len(grads)}, {len(tensors)}")
    for i, (g, x) in enumerate(zip(grads, tensors)):
        if g.numel() != x.numel():
            raise ValueError(f"tensors[{i}] must have grads[{i}]'s size")


def num_chunks(numel: int, offset: int = 0) -> int:
    """Number of 4096-element stream chunks that elements ``offset .. offset + numel - 1`` touch."""
    if numel <= 0:
        return 0
    return (offset + numel - 1) // CHUNK - offset // CHUNK + 1


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """``sum(floor((a * i + b) / m) for i in range(n))`` for ``a, b >= 0``, ``m > 0``, in
    ``O(log m)`` steps (the Euclid-like recursion)."""
    total = 0
    while n > 0:
        if a >= m:
            total += (n - 1) * n // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        top = a * n + b
        if top < m:
            break
        n, b = top // m, top % m
        m, a = a, m
    return total


def run_chunks(numel: int, offset: int, run: int, stride: int) -> int:
    """Chunks a tensor of ``numel`` elements in runs of ``run`` (stride ``stride``) touches,
    counted run by run: the length of its part of ``starts``."""
    if numel <= 0:
        return 0
    rows = numel // run
    if rows == 1:
        return num_chunks(run, offset)
    # sum over r of (offset + r*stride + run - 1) // CHUNK - (offset + r*stride) // CHUNK + 1
    return (
        rows
        + floor_sum(rows, CHUNK, stride, offset + run - 1)
        - floor_sum(rows, CHUNK, stride, offset)
    )

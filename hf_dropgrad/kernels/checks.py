"""Argument checks shared by every masking backend."""

from __future__ import annotations

import operator
from collections.abc import Sequence

__all__ = ["MAX_OFFSET", "check_lengths", "check_offset", "check_offsets"]

#: Offsets (global element indices) stay below this, so ``offset + numel`` fits an int64 and the
#: counter ``chunk * 1024 + b`` of the stream cannot wrap.
MAX_OFFSET = 1 << 62


def check_offset(offset: int, name: str = "offset") -> int:
    """``offset`` as an int in ``[0, 2**62)``, or a ``TypeError`` / ``ValueError`` naming it."""
    if not isinstance(offset, int) or isinstance(offset, bool):
        try:
            if isinstance(offset, bool):
                raise TypeError
            offset = operator.index(offset)  # numpy / torch integer scalars
        except TypeError:
            raise TypeError(
                f"{name} must be an int (a global element index), got {type(offset).__name__}"
            ) from None
    if not 0 <= offset < MAX_OFFSET:
        raise ValueError(f"{name} must be in [0, 2**62), got {offset}")
    return int(offset)


def check_offsets(offsets: Sequence[int] | None, n: int) -> list[int]:
    """One offset per tensor (``None``: all 0), each checked by :func:`check_offset`."""
    if offsets is None:
        return [0] * n
    if len(offsets) != n:
        raise ValueError(f"offsets must have one entry per tensor ({n}), got {len(offsets)}")
    return [check_offset(o, f"offsets[{i}]") for i, o in enumerate(offsets)]


def check_lengths(grads: Sequence, keys: Sequence, thresholds: Sequence, scales: Sequence) -> int:
    """The number of tensors, or a ``ValueError`` if the four lists differ in length."""
    n = len(grads)
    if not len(keys) == len(thresholds) == len(scales) == n:
        raise ValueError(
            f"grads, keys, thresholds and scales differ in length: "
            f"{n}, {len(keys)}, {len(thresholds)}, {len(scales)}"
        )
    return n

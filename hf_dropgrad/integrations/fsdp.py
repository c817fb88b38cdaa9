"""FSDP2 (``fully_shard``): where a process's ``DTensor`` shard sits in the full parameter.

FSDP2 parameters placed ``Shard(0)`` (and ``Replicate`` on other mesh dimensions, as in HSDP)
hold their local rows, a contiguous run starting at ``first row * row size``. Anything else
(``Shard(d)`` with ``d > 0``, ``Partial``, strided shards, FSDP1's flat parameters) is refused
by :func:`check_param` with an error that says why, so DropGrad never trains silently wrong.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hf_dropgrad.layout import Piece, register_sharded

__all__ = ["check_param", "check_parameters", "dtensor_offset", "local_piece"]

#: The torch version whose DTensor internals this module reads: ``DTensor._local_tensor`` and
#: the private ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``.
CHECKED_AGAINST = "torch 2.13"


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def _is_flat_param(p: Any) -> bool:
    # FSDP1's FlatParameter (checked against torch 2.13: `_is_flat_param` is set on it).
    return type(p).__name__ == "FlatParameter" or bool(getattr(p, "_is_flat_param", False))


def _placement_problem(t: Any, what: str) -> str | None:
    """Why the ``DTensor`` ``t`` cannot be masked exactly, or ``None`` when it can."""
    from torch.distributed.tensor.placement_types import Replicate, Shard

    for placement in t.placements:
        if type(placement) is Shard and placement.dim == 0:
            continue
        if type(placement) is Replicate:
            continue
        return (
            f"DropGrad cannot mask a {what} placed {tuple(t.placements)} exactly: only "
            "Shard(0) (FSDP2's fully_shard) and Replicate (HSDP's replica dimension) keep each "
            "process's share a contiguous run of the full parameter. Shard(d > 0) and strided "
            "shards (tensor parallel, FSDP2 over TP) and Partial are not supported; train that "
            "parameter with FSDP2 alone, or leave it without a rate."
        )
    return None


def check_param(p: Any, name: str | int | None = None) -> None:
    """Raise if DropGrad cannot mask ``p``'s gradient exactly in this process.

    Accepts plain tensors and ``DTensor`` parameters whose placements are ``Shard(0)`` or
    ``Replicate``; refuses other placements and FSDP1's flat parameters with a clear error.
    """
    label = "parameter" if name is None else f"parameter {name!r}"
    if _is_flat_param(p):
        raise ValueError(
            f"DropGrad does not support FSDP1 flat parameters ({label}): FSDP1 flattens several "
            "parameters into one shard, so a mask per parameter cannot be placed on it. Use "
            "FSDP2 (fully_shard; `fsdp_version: 2` in the Accelerate config), which DropGrad "
            "masks exactly, or DDP."
        )
    if _is_dtensor(p):
        problem = _placement_problem(p, label)
        if problem is not None:
            raise ValueError(problem)


def check_parameters(dropgrad: Any) -> None:
    """Refuse, before the first step, parameters of ``dropgrad`` it cannot mask exactly.

    Nothing to check when an engine steps flat partitions (a layout is set).
    """
    if dropgrad.layout is not None:
        return
    index = 0
    for group in dropgrad.param_groups:
        for p in group["params"]:
            check_param(p, dropgrad.name_of(index))
            index += 1


def dtensor_offset(t: Any) -> int:
    """Global flat index of the first element of the ``DTensor`` ``t``'s local shard."""
    # Private torch API, checked against torch 2.13 (CHECKED_AGAINST).
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t._local_tensor
    if tuple(local.shape) != tuple(shape):  # padding or a layout we do not know: refuse
        raise ValueError(
            f"DropGrad: a DTensor's local shard has shape {tuple(local.shape)}, not the "
            f"{tuple(shape)} its placements {tuple(t.placements)} imply; cannot place its mask"
        )
    return int(offset[0]) * math.prod(t.shape[1:]) if len(offset) else 0


def _local_grad(p: Any) -> torch.Tensor | None:
    grad = p.grad
    if grad is None:
        return None
    if _is_dtensor(grad):
        problem = _placement_problem(grad, "gradient")
        if problem is not None:
            raise RuntimeError(problem)
        if tuple(grad.placements) != tuple(p.placements):
            raise RuntimeError(
                f"DropGrad: a gradient placed {tuple(grad.placements)} belongs to a parameter "
                f"placed {tuple(p.placements)}; cannot place its mask"
            )
        return grad._local_tensor
    return grad


def local_piece(p: Any) -> Piece | None:
    """The local shard of the sharded parameter ``p`` as a :class:`~hf_dropgrad.layout.Piece`
    (``None`` if ``p`` is not a ``DTensor``; an FSDP1 flat parameter is refused)."""
    if not (_is_flat_param(p) or _is_dtensor(p)):
        return None
    check_param(p)
    return Piece(p._local_tensor, dtensor_offset(p), lambda: _local_grad(p))


register_sharded(local_piece)  # hf_dropgrad/__init__.py imports this module

"""Where a process's share of each gradient sits in the full parameter.

The mask of element ``e`` of a parameter depends only on ``(seed, step, parameter position,
e)``, where ``e`` is the element's index in the **full, unsharded** parameter. A sharded
engine gives each process a contiguous run of a parameter's elements; masking that run with
its parameter's key and the run's global offset draws exactly the elements of the full mask
that the run holds, so the union over processes is the mask of a 1-process run.

This module turns what an engine hands the optimizer into :class:`Piece` objects, each a
contiguous run ``(parameter position, global offset, local data, local gradient)``:

- plain tensors (one process, DDP, DeepSpeed ZeRO-0): the whole parameter, offset 0;
- FSDP2 (``fully_shard``) ``DTensor`` parameters placed ``Shard(0)`` (and ``Replicate`` on
  other mesh dimensions, as in HSDP): the local rows, at ``first row * row size``;
- DeepSpeed ZeRO-1/2, whose client optimizer steps one flat fp32 partition per group: the
  ranges of that partition, mapped back to (parameter, element offset) by each parameter's
  ``_hp_mapping`` (a parameter may straddle two ranks);
- DeepSpeed ZeRO-3, which steps a flat fp32 buffer of per-parameter partitions: each
  partition at ``partition size * partition rank`` (its padding is left alone).

Anything else a sharded engine could hand over (``Shard(d)`` with ``d > 0``, ``Partial``,
strided shards, FSDP1's flat parameters) is refused by :func:`check_param` with an error that
says why, so DropGrad never trains silently wrong. Nothing here imports DeepSpeed: its
optimizers are recognised by their attributes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = [
    "Piece",
    "ZeroLayout",
    "attach_deepspeed",
    "check_param",
    "dtensor_offset",
    "local_target",
    "offset_of",
    "zero_layout",
    "zero_param_groups",
    "zero_stage",
]


class Piece:
    """A contiguous run of a parameter's elements held by this process.

    Args:
        data: the run's values (a contiguous 1-D or N-D view the step updates in place).
        offset: global flat index of ``data``'s first element in the full parameter.
        grad_of: returns the run's gradient (same shape as ``data``) or ``None``; called at
            masking time, so a closure's fresh gradients are the ones masked.
    """

    __slots__ = ("_grad_of", "data", "offset")

    def __init__(
        self, data: torch.Tensor, offset: int, grad_of: Callable[[], torch.Tensor | None]
    ) -> None:
        self.data, self.offset, self._grad_of = data, offset, grad_of

    @property
    def grad(self) -> torch.Tensor | None:
        return self._grad_of()

    def __repr__(self) -> str:
        return f"Piece(numel={self.data.numel()}, offset={self.offset})"


def offset_of(target: Any) -> int:
    """Global element offset of a masking target (a plain parameter starts at 0)."""
    return target.offset if isinstance(target, Piece) else 0


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def _is_flat_param(p: Any) -> bool:
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


def dtensor_offset(t: Any) -> int:
    """Global flat index of the first element of the ``DTensor`` ``t``'s local shard."""
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


def local_target(p: torch.Tensor) -> torch.Tensor | Piece:
    """What DropGrad masks for parameter ``p``: ``p`` itself, or its local shard as a Piece."""
    if _is_flat_param(p) or _is_dtensor(p):
        check_param(p)
        return Piece(p._local_tensor, dtensor_offset(p), lambda: _local_grad(p))
    return p


# -- DeepSpeed ZeRO ---------------------------------------------------------------------------


class ZeroLayout:
    """Where each parameter's share sits in DeepSpeed ZeRO's flat fp32 partitions.

    ``segments[id(flat)]`` lists ``(start in flat, numel, parameter position, offset in the
    parameter)``. DeepSpeed keeps the flat tensors for the whole run, and calls the client
    optimizer's ``step()`` with only the groups of one partition in ``param_groups``: the
    pieces of a step are those of the flat tensors present then.
    """

    def __init__(self, segments: dict[int, list[tuple[int, int, int, int]]], stage: int) -> None:
        self.segments = segments
        self.stage = stage

    def pieces(self, param_groups: Iterable[dict[str, Any]]) -> Iterator[tuple[int, Piece]]:
        for group in param_groups:
            for flat in group["params"]:
                segments = self.segments.get(id(flat))
                if segments is None:
                    raise RuntimeError(
                        "DropGrad under DeepSpeed ZeRO was handed a tensor that is not one of "
                        "ZeRO's fp32 partitions; cannot place its mask"
                    )
                for start, numel, index, offset in segments:
                    data = flat.detach().narrow(0, start, numel)
                    yield index, Piece(data, offset, _narrow_grad(flat, start, numel))


def _narrow_grad(flat: torch.Tensor, start: int, numel: int) -> Callable[[], torch.Tensor | None]:
    def grad_of() -> torch.Tensor | None:
        grad = flat.grad
        return None if grad is None else grad.narrow(0, start, numel)

    return grad_of


def zero_stage(zero: Any) -> int:
    """DeepSpeed ZeRO stage of the optimizer ``zero`` (1, 2 or 3), 0 if it is none of them."""
    if hasattr(zero, "fp32_partitioned_groups_flat") and hasattr(zero, "fp16_groups"):
        return 3
    if hasattr(zero, "single_partition_of_fp32_groups") and hasattr(zero, "bit16_groups"):
        return 2 if getattr(zero, "partition_gradients", False) else 1
    return 0


def zero_param_groups(zero: Any) -> list[list[torch.Tensor]]:
    """The model parameters of each of the client optimizer's groups, as ZeRO partitioned them."""
    stage = zero_stage(zero)
    if stage in (1, 2):
        return [list(group) for group in zero.bit16_groups]
    groups: dict[int, list[torch.Tensor]] = {}
    for sub_group, params in enumerate(zero.fp16_groups):
        groups.setdefault(zero.sub_group_to_group_id[sub_group], []).extend(params)
    return [groups.get(i, []) for i in range(len(zero.optimizer.param_groups))]


def _positions(groups: list[list[torch.Tensor]], num_params: int, stage: int) -> dict[int, int]:
    position = {}
    for p in (p for group in groups for p in group):
        position[id(p)] = len(position)
    if len(position) != num_params:
        raise ValueError(
            f"DropGrad under DeepSpeed ZeRO-{stage}: ZeRO trains {len(position)} parameters but "
            f"DropGrad was built over {num_params}; build the optimizer from the trainable "
            "parameters only (as Trainer.create_optimizer does), so positions agree"
        )
    return position


def zero_layout(zero: Any, num_params: int) -> ZeroLayout:
    """Map DeepSpeed ZeRO's flat fp32 partitions of this rank back to parameter elements."""
    import torch.distributed as dist

    stage = zero_stage(zero)
    segments: dict[int, list[tuple[int, int, int, int]]] = {}
    if stage in (1, 2):
        position = _positions(zero.bit16_groups, num_params, stage)
        for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            runs = segments.setdefault(id(flat), [])
            for p in group:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:  # none of this parameter lives on this rank
                    continue
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                runs.append((hp.start, lp.numel, position[id(p)], lp.start))
    elif stage == 3:
        position = _positions(zero.fp16_groups, num_params, stage)
        for group, flat in zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat):
            runs = segments.setdefault(id(flat), [])
            start = 0
            for p in group:
                size = p.partition_numel()
                rank = getattr(p, "ds_zero_partition_rank", None)
                if rank is None:
                    rank = dist.get_rank(group=p.ds_process_group)
                first = size * rank
                held = max(0, min(size, p.ds_numel - first))  # the last partition is padded
                if held:
                    runs.append((start, held, position[id(p)], first))
                start += size
    else:
        raise ValueError(f"not a DeepSpeed ZeRO optimizer: {type(zero).__name__}")
    return ZeroLayout(segments, stage)


def attach_deepspeed(zero: Any, dropgrad: Any) -> ZeroLayout:
    """Make ``dropgrad`` (the client optimizer of the ZeRO optimizer ``zero``) exact under ZeRO.

    ZeRO calls the client's ``step()`` once per partition group: ``dropgrad`` masks the
    pieces of the partitions it is handed and no longer advances its step count itself;
    ``zero.step()`` advances it once per optimizer step that is not skipped (fp16 overflow).
    The Trainer layer sets the step from ``state.global_step`` anyway.
    """
    if getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False):
        # The offloaded partitions live on the CPU, which is fine, but ZeRO-3 may also step a
        # GPU backup optimizer that DropGrad does not wrap.
        if zero_stage(zero) == 3:
            raise ValueError(
                "DropGrad does not support DeepSpeed ZeRO-3 with offload_optimizer: ZeRO then "
                "steps some partitions with a second optimizer DropGrad does not wrap"
            )
    if getattr(zero, "_dropgrad_attached", None) is dropgrad and dropgrad._layout is not None:
        return dropgrad._layout  # installing wraps and attaches; training start attaches again
    layout = zero_layout(zero, dropgrad._num_params)
    dropgrad._set_layout(layout)
    zero._dropgrad_attached = dropgrad
    if not getattr(zero, "_dropgrad_step_patched", False):
        original = zero.step

        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if not getattr(zero, "overflow", False):
                zero._dropgrad_attached._advance()
            return out

        zero.step = step
        zero._dropgrad_step_patched = True
    return layout

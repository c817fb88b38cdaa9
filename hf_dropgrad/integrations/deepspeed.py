"""DeepSpeed ZeRO-1/2/3: map the flat fp32 partitions ZeRO steps back to parameter elements.

- ZeRO-1/2: the client optimizer steps one flat fp32 partition per group; each owned
  parameter's ``_hp_mapping`` says which range of the partition holds which of its elements
  (a parameter may straddle two ranks).
- ZeRO-3: a flat fp32 buffer of per-parameter partitions, each at ``partition size *
  partition rank`` of its parameter (the last one padded).

DeepSpeed is never imported: its optimizers are recognised by their attributes. Everything
read here was checked against **deepspeed 0.19.8** (:data:`CHECKED_AGAINST`):
``bit16_groups``, ``single_partition_of_fp32_groups``, ``partition_gradients``,
``_hp_mapping.lp_fragment_address`` / ``hp_fragment_address`` (ZeRO-1/2);
``fp16_groups``, ``fp32_partitioned_groups_flat``, ``sub_group_to_group_id``,
``partition_numel()``, ``ds_numel``, ``ds_zero_partition_rank``, ``ds_process_group``
(ZeRO-3); ``overflow``, ``cpu_offload`` / ``offload_optimizer`` and ``step()`` on both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hf_dropgrad.layout import FlatLayout, Segment
from hf_dropgrad.optimizer import get_dropgrad, optimizer_chain

__all__ = [
    "CHECKED_AGAINST",
    "attach_deepspeed",
    "attach_layout",
    "install_under_deepspeed",
    "zero_layout",
    "zero_optimizer",
    "zero_param_groups",
    "zero_stage",
]

CHECKED_AGAINST = "deepspeed 0.19.8"

# What this module stamps onto the ZeRO optimizer: the DropGrad it steps, and that its step()
# was wrapped (once). Attributes, not a weak registry: ZeRO may be any object with its fields.
_ATTACHED = "_dropgrad_attached"
_STEP_PATCHED = "_dropgrad_step_patched"


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


def zero_layout(zero: Any, num_params: int) -> FlatLayout:
    """Map DeepSpeed ZeRO's flat fp32 partitions of this rank back to parameter elements."""
    import torch.distributed as dist

    stage = zero_stage(zero)
    segments: dict[int, list[Segment]] = {}
    if stage in (1, 2):
        position = _positions(zero.bit16_groups, num_params, stage)
        for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            runs = segments.setdefault(id(flat), [])
            for p in group:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:  # none of this parameter lives on this rank
                    continue
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                runs.append(Segment(hp.start, lp.numel, position[id(p)], lp.start))
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
                    runs.append(Segment(start, held, position[id(p)], first))
                start += size
    else:
        raise ValueError(f"not a DeepSpeed ZeRO optimizer: {type(zero).__name__}")
    return FlatLayout(segments, engine=f"DeepSpeed ZeRO-{stage}")


def attach_layout(zero: Any, dropgrad: Any) -> FlatLayout:
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
    layout = zero_layout(zero, dropgrad.num_params)
    dropgrad.set_layout(layout)
    setattr(zero, _ATTACHED, dropgrad)
    if not getattr(zero, _STEP_PATCHED, False):
        original = zero.step

        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if not getattr(zero, "overflow", False):
                getattr(zero, _ATTACHED).advance()
            return out

        zero.step = step
        setattr(zero, _STEP_PATCHED, True)
    return layout


def zero_optimizer(holder: Any) -> Any:
    """The DeepSpeed ZeRO optimizer in the ``.optimizer`` chain of ``holder``, or ``None``.

    Raises ``ValueError`` when the chain holds another DeepSpeed optimizer wrapper (fp16/bf16
    without ZeRO), whose flat buffers DropGrad cannot map.
    """
    for obj in optimizer_chain(holder):
        if zero_stage(obj):
            return obj
        if type(obj).__module__.startswith("deepspeed.") and hasattr(obj, "optimizer"):
            raise ValueError(
                f"DropGrad does not support DeepSpeed's {type(obj).__name__}: it steps flat "
                "buffers DropGrad cannot map back to parameters. Use ZeRO stage 1, 2 or 3."
            )
    return None


def install_under_deepspeed(zero: Any, dropgrad: Any, build: Callable[[Any], Any]) -> Any:
    """Make DropGrad exact inside the ZeRO optimizer ``zero``; returns the ``DropGrad``.

    Args:
        zero: DeepSpeed's ZeRO-1/2/3 optimizer.
        dropgrad: the ``DropGrad`` already inside it (the ``Trainer`` built the client
            optimizer through ``create_optimizer``), or ``None``.
        build: ``build(optimizer) -> DropGrad`` for the case where ZeRO steps an optimizer
            DropGrad is not in yet (a DeepSpeed config ``optimizer`` block, or
            ``DropGradCallback`` on a plain ``Trainer``): it is then wrapped, with the
            model's parameters put back in its groups while ``DropGrad`` reads positions,
            names and patterns from them.
    """
    if dropgrad is None:
        client = zero.optimizer
        flat = [group["params"] for group in client.param_groups]
        originals = zero_param_groups(zero)
        if len(originals) != len(flat):
            raise ValueError(
                f"DropGrad: DeepSpeed ZeRO has {len(originals)} parameter groups but its "
                f"optimizer {len(flat)}; cannot map its partitions back to parameters"
            )
        try:
            for group, params in zip(client.param_groups, originals):
                group["params"] = list(params)
            dropgrad = build(client)
        finally:
            for group, params in zip(client.param_groups, flat):
                group["params"] = params
        zero.optimizer = dropgrad
    attach_layout(zero, dropgrad)
    return dropgrad


def attach_deepspeed(optimizer: Any) -> Any:
    """Make the ``DropGrad`` inside a DeepSpeed engine's optimizer exact, in your own loop.

    The ``Trainer`` layer does this by itself. In a plain DeepSpeed loop, pass a ``DropGrad``
    as the optimizer and call this once after ``deepspeed.initialize``; ``engine.step()`` then
    masks ZeRO's partitions at their offsets and advances DropGrad's step once per optimizer
    step.

    Args:
        optimizer: the engine's optimizer (``engine.optimizer``), or any ``.optimizer`` chain
            around DeepSpeed's ZeRO optimizer.

    Returns:
        The ``DropGrad``.

    Example::

        >>> opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-4), drop_rate=0.1)
        >>> engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        >>> attach_deepspeed(engine.optimizer)
    """
    zero = zero_optimizer(optimizer)
    dropgrad = get_dropgrad(optimizer)
    if zero is None or dropgrad is None:
        raise ValueError(
            "attach_deepspeed needs a DeepSpeed ZeRO (stage 1-3) optimizer whose client optimizer "
            "is a DropGrad: pass optimizer=DropGrad(...) to deepspeed.initialize and then "
            "engine.optimizer here"
        )
    return install_under_deepspeed(zero, dropgrad, build=lambda optimizer: None)

"""Which training engines DropGrad runs under exactly, and how it gets inside each of them.

Exact (the masks are those of a 1-process run; see :mod:`hf_dropgrad.sharding`):

- one process, DDP (``accelerate launch --multi_gpu``, ``torchrun``), DeepSpeed ZeRO-0 in fp32;
- FSDP2 (``fully_shard``; Accelerate's ``fsdp_version: 2``, the Trainer's default
  ``fsdp_config={"version": 2}``);
- DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3, with or without an ``optimizer`` block in the DeepSpeed
  config: without one the ``Trainer`` hands its (DropGrad-wrapped) optimizer to DeepSpeed;
  with one, or under ``DropGradCallback`` on a plain ``Trainer``, DropGrad wraps the optimizer
  ZeRO steps once DeepSpeed has built it.

Refused at the start of training, with the reason: FSDP1 (flat parameters), DeepSpeed's
fp16/bf16 optimizers without ZeRO (stage 0), ZeRO-3 with ``offload_optimizer``, and any
placement other than ``Shard(0)`` / ``Replicate`` (tensor parallel).

Nothing here imports Transformers, Accelerate or DeepSpeed: their objects are recognised by
their attributes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_dropgrad import sharding

__all__ = [
    "attach_deepspeed", "check_supported_setup", "install_under_deepspeed", "zero_optimizer",
]


def _deepspeed_config(args: Any, state: Any) -> dict | None:
    plugin = getattr(state, "deepspeed_plugin", None)
    config = getattr(plugin, "deepspeed_config", None)
    if isinstance(config, dict):
        return config
    config = getattr(args, "deepspeed", None)
    if isinstance(config, (str, Path)) and Path(config).is_file():
        return json.loads(Path(config).read_text())
    return config if isinstance(config, dict) else None


def _fsdp_version(args: Any, state: Any) -> int | None:
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", None) is not None:
        return int(plugin.fsdp_version)
    if getattr(args, "fsdp", None):
        config = getattr(args, "fsdp_config", None) or {}
        return int(config.get("version", config.get("fsdp_version", 2)))
    return None


def check_supported_setup(args: Any, accelerator: Any = None) -> None:
    """Refuse, before training starts, the setups where DropGrad cannot be exact.

    Args:
        args: the Trainer's ``TrainingArguments`` (or ``None`` in a plain Accelerate loop).
        accelerator: an ``Accelerator`` or its ``AcceleratorState`` (what the launcher chose).

    Raises:
        ValueError: for FSDP1, and for DeepSpeed without ZeRO under fp16/bf16 (its optimizer
            then steps flat buffers DropGrad cannot map back to parameters).
    """
    state = getattr(accelerator, "state", accelerator)
    distributed_type = str(getattr(state, "distributed_type", ""))
    if getattr(args, "fsdp", None) or "FSDP" in distributed_type:
        version = _fsdp_version(args, state)
        if version is not None and version < 2:
            raise ValueError(
                "DropGrad does not support FSDP1: it flattens several parameters into one "
                "sharded flat parameter, so a mask per parameter cannot be placed on it. Use "
                "FSDP2 (`fsdp_version: 2` in the Accelerate config, or the Trainer's default "
                "`fsdp_config={'version': 2}`), which DropGrad masks exactly, or DDP."
            )
    if getattr(args, "deepspeed", None) or "DEEPSPEED" in distributed_type:
        config = _deepspeed_config(args, state) or {}
        stage = (config.get("zero_optimization") or {}).get("stage", 0)
        half = any((config.get(k) or {}).get("enabled") is True for k in ("fp16", "bf16"))
        if stage == 0 and half:
            raise ValueError(
                "DropGrad does not support DeepSpeed's fp16/bf16 optimizer without ZeRO "
                "(zero_optimization.stage 0): it steps flat buffers DropGrad cannot map back to "
                "parameters. Use ZeRO stage 1, 2 or 3, which DropGrad masks exactly."
            )


def zero_optimizer(holder: Any) -> Any:
    """The DeepSpeed ZeRO optimizer in the ``.optimizer`` chain of ``holder``, or ``None``.

    Raises ``ValueError`` when the chain holds another DeepSpeed optimizer wrapper (fp16/bf16
    without ZeRO), whose flat buffers DropGrad cannot map.
    """
    from hf_dropgrad.optimizer import optimizer_chain

    for obj in optimizer_chain(holder):
        if sharding.zero_stage(obj):
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
        originals = sharding.zero_param_groups(zero)
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
    sharding.attach_deepspeed(zero, dropgrad)
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
    from hf_dropgrad.optimizer import get_dropgrad

    zero = zero_optimizer(optimizer)
    dropgrad = get_dropgrad(optimizer)
    if zero is None or dropgrad is None:
        raise ValueError(
            "attach_deepspeed needs a DeepSpeed ZeRO (stage 1-3) optimizer whose client optimizer "
            "is a DropGrad: pass optimizer=DropGrad(...) to deepspeed.initialize and then "
            "engine.optimizer here"
        )
    return install_under_deepspeed(zero, dropgrad, build=lambda optimizer: None)


def check_parameters(dropgrad: Any) -> None:
    """Refuse, before the first step, parameters DropGrad cannot mask exactly."""
    if dropgrad._layout is not None:
        return
    for index, p in enumerate(dropgrad._all_params()):
        sharding.check_param(p, dropgrad._names.get(index, index))

"""Accelerate (and the launchers behind it): which setups are exact, and its fp16 step method.

:func:`check_supported_setup` reads what the launcher chose (an ``Accelerator``'s state, the
Trainer's ``--fsdp``/``--deepspeed`` arguments) and refuses the setups DropGrad cannot mask
exactly; a plain Accelerate loop calls it after ``Accelerator()``.
:func:`rebind_step` re-captures the step method Accelerate's ``AcceleratedOptimizer`` keeps
under fp16, when DropGrad is slipped in under an already prepared optimizer.

Accelerate is never imported at module level; what is read was checked against
**accelerate 1.16** (:data:`CHECKED_AGAINST`): ``AcceleratorState.distributed_type``,
``.fsdp_plugin.fsdp_version``, ``.deepspeed_plugin.deepspeed_config``, and the private
``AcceleratedOptimizer._optimizer_original_step_method`` /
``_optimizer_patched_step_method`` with ``accelerate.optimizer.patch_optimizer_step``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CHECKED_AGAINST", "check_supported_setup", "rebind_step"]

CHECKED_AGAINST = "accelerate 1.16"


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

    FSDP2 and DeepSpeed ZeRO-1/2/3 are exact; FSDP1 and DeepSpeed's fp16/bf16 optimizer
    without ZeRO are refused.

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


def rebind_step(wrapper: Any, optimizer: Any) -> None:
    """Make Accelerate's optimizer ``wrapper`` step ``optimizer``, its new inner optimizer.

    Under fp16, ``AcceleratedOptimizer`` swaps in a step method it captured from the old
    optimizer when it was built; without re-capturing, GradScaler would call the old
    optimizer's step and skip the masks. Does nothing for other wrappers.
    """
    if not hasattr(wrapper, "_optimizer_patched_step_method"):
        return
    from accelerate.optimizer import patch_optimizer_step

    wrapper._optimizer_original_step_method = optimizer.step
    wrapper._optimizer_patched_step_method = patch_optimizer_step(wrapper, optimizer.step)

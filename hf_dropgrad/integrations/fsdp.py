"""FSDP: FSDP1's refusal, and the start-of-training check of every sharded parameter.

FSDP2 (``fully_shard``) parameters are ``DTensor``s, masked exactly whatever their placements by
:mod:`hf_dropgrad.integrations.dtensor` (so are tensor-parallel and N-D mesh parameters). FSDP1
flattens several parameters into one ``FlatParameter``, so a mask per parameter cannot be placed
on it: a flat parameter that has a rate is refused with an error that says what to use instead.
A parameter with no rate (or rate 0 and no schedule) is never refused, whatever it is.
"""

from __future__ import annotations

from typing import Any

from hf_dropgrad.integrations.dtensor import CHECKED_AGAINST, is_dtensor, local_of
from hf_dropgrad.layout import register_sharded

__all__ = ["CHECKED_AGAINST", "check_param", "check_parameters"]


def _is_flat_param(p: Any) -> bool:
    # FSDP1's FlatParameter (checked against torch 2.13: `_is_flat_param` is set on it).
    return type(p).__name__ == "FlatParameter" or bool(getattr(p, "_is_flat_param", False))


def _label(name: str | int | None) -> str:
    if name is None:
        return "parameter"
    return f"parameter {name}" if isinstance(name, int) else f"parameter {name!r}"


def check_param(p: Any, name: str | int | None = None) -> None:
    """Raise if DropGrad cannot mask ``p``'s gradient exactly in this process.

    Plain tensors and ``DTensor`` parameters of any Shard / _StridedShard / Replicate / Partial
    placements on any mesh are accepted (their local shape is checked against the placements);
    FSDP1's flat parameters and unknown placements are refused with a clear error naming
    ``name``.
    """
    if _is_flat_param(p):
        raise ValueError(
            f"DropGrad does not support FSDP1 flat parameters ({_label(name)}): FSDP1 flattens "
            "several parameters into one shard, so a mask per parameter cannot be placed on it. "
            "Use FSDP2 (fully_shard; `fsdp_version: 2` in the Accelerate config), which DropGrad "
            "masks exactly, or DDP."
        )
    if is_dtensor(p):
        local = local_of(p, name)
        assert local is not None
        local.values()  # raises, naming the parameter, for a layout it cannot place


def check_parameters(dropgrad: Any) -> None:
    """Refuse, before the first step, parameters of ``dropgrad`` that have a rate and that it
    cannot mask exactly (naming each). Parameters it never masks are not looked at.

    Nothing to check when an engine steps flat partitions (a layout is set).
    """
    if dropgrad.layout is not None:
        return
    index = 0
    for group in dropgrad.param_groups:
        for p in group["params"]:
            if dropgrad.may_mask(index):
                check_param(p, dropgrad.name_of(index))
            index += 1


def _refuse_flat(p: Any, name: str | int | None) -> None:
    if _is_flat_param(p):
        check_param(p, name)  # raises
    return None


register_sharded(_refuse_flat)  # hf_dropgrad/__init__.py imports this module

"""The Trainer's optimizers that update the parameters inside ``backward()``, served from hooks;
and the guards against any other optimizer whose updates bypass ``step()``.

Two kinds of ``--optim`` update the parameters while ``backward()`` runs, before the Trainer
calls ``optimizer.step()``:

* ``*_layerwise`` (``galore_adamw_layerwise``, ``apollo_adamw_layerwise``, ...): transformers
  builds one optimizer per parameter, keeps them in ``LayerWiseDummyOptimizer.optimizer_dict``
  (in the order the plain ``galore_adamw`` holds the parameters), steps each in its parameter's
  post-accumulate-grad hook, and hands the Trainer the dummy, whose ``step()`` does nothing;
* ``lomo``, ``adalomo``: Accelerate recognises the prepared optimizer as LOMO by ``isinstance``
  and calls its ``fused_backward(loss, lr)``, whose hooks update each parameter from its
  gradient during ``backward()``.

A ``DropGrad`` wrapped into the chain would mask nothing for the first (the dummy holds none of
the model's parameters) and would hide LOMO from Accelerate's checks (a crash at the first
backward). So the chain is left exactly as transformers and Accelerate built it, and the
optimizer is served from beside it by a ``DropGrad(InBackward(...))`` over its parameters (their
positions, hence the masks, are those of a plain run), which masks each gradient where the
update reads it:

* layerwise: every entry of ``optimizer_dict`` becomes a :class:`MaskedStep`, which steps the
  parameter's optimizer inside ``dropgrad.parameter_step(p)``, so the hook transformers
  registered masks (and, with full update drop, restores) around the update;
* LOMO/AdaLomo: ``dropgrad.register_mask_hooks()``: each gradient is masked as it is
  accumulated, before LOMO's hooks (which run later in the same ``backward()``) read it.

The caller calls ``dropgrad.step()`` after each optimizer step (full update drop's restore, the
step count). Transformers-free: the optimizers are recognised by attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from hf_dropgrad.in_backward import InBackward, mark_served, served_by
from hf_dropgrad.optimizer import DropGrad, optimizer_chain

__all__ = [
    "MaskedStep",
    "check_gradients_at_step",
    "check_in_backward_run",
    "check_updates_the_model",
    "find_in_backward",
    "install_in_backward",
    "kind_of",
]

LAYERWISE = "layerwise"
LOMO = "lomo"


def kind_of(optimizer: Any) -> str | None:
    """``"layerwise"`` (transformers' ``LayerWiseDummyOptimizer``: an ``optimizer_dict`` of
    per-parameter optimizers), ``"lomo"`` (``lomo_optim``'s ``Lomo``/``AdaLomo``), or ``None``.

    Any other optimizer with a ``fused_backward`` is not served: ``DropGrad`` refuses it."""
    table = getattr(optimizer, "optimizer_dict", None)
    if isinstance(table, Mapping) and table and all(
        isinstance(o, torch.optim.Optimizer | MaskedStep) for o in table.values()
    ):
        return LAYERWISE
    if callable(getattr(optimizer, "fused_backward", None)) and (
        type(optimizer).__module__.split(".")[0] == "lomo_optim"
    ):
        return LOMO
    return None


def find_in_backward(holder: Any) -> Any | None:
    """The optimizer in ``holder``'s chain that updates inside ``backward()`` and that this
    module serves (:func:`kind_of`), or ``None``."""
    return next((o for o in optimizer_chain(holder) if kind_of(o) is not None), None)


class MaskedStep:
    """Stands for one parameter's optimizer in a layer-wise ``optimizer_dict``: ``step()`` runs
    the optimizer's step inside ``dropgrad.parameter_step(param)``; everything else (its
    ``param_groups``, ``zero_grad()``, ...) is the optimizer's own.

    Args:
        optimizer: the parameter's optimizer (what the LR scheduler transformers built for it
            holds, unchanged).
        dropgrad: the ``DropGrad`` over the ``InBackward`` of all of them.
        param: the parameter.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, dropgrad: DropGrad,
                 param: torch.Tensor) -> None:
        self.optimizer = optimizer
        self.dropgrad = dropgrad
        self.param = param

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        with self.dropgrad.parameter_step(self.param):
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"MaskedStep({self.optimizer!r})"


def install_in_backward(
    optimizer: Any, build: Callable[[torch.optim.Optimizer], DropGrad]
) -> tuple[DropGrad, bool]:
    """Serve ``optimizer`` (:func:`kind_of` is not ``None``) with a ``DropGrad`` over the
    :class:`~hf_dropgrad.in_backward.InBackward` of its parameters, built by ``build``, once.

    Returns ``(dropgrad, built)``: the ``DropGrad`` that serves it (an earlier call's, else a
    new one) and whether this call built it. ``get_dropgrad`` finds it from any chain that
    holds ``optimizer``.
    """
    served = served_by(optimizer)
    if isinstance(served, DropGrad):
        return served, False
    kind = kind_of(optimizer)
    if kind == LAYERWISE:
        table = optimizer.optimizer_dict
        dropgrad = build(InBackward(list(table.values())))
        for param, inner in list(table.items()):
            table[param] = MaskedStep(inner, dropgrad, param)
    elif kind == LOMO:
        dropgrad = build(InBackward(optimizer))
        dropgrad.register_mask_hooks()
    else:
        raise ValueError(f"{type(optimizer).__name__} does not update inside backward()")
    mark_served(optimizer, dropgrad)
    return dropgrad, True


def check_in_backward_run(optimizer: Any, gradient_accumulation_steps: int, world_size: int,
                          label: str = "") -> None:
    """Refuse what DropGrad cannot serve exactly with an optimizer that updates inside
    ``backward()``: gradient accumulation (each ``backward()`` updates, so there is no
    accumulated gradient to mask once per optimizer step) and several processes (untested:
    the hooks would run around the data-parallel reductions). ``label`` names the optimizer as
    the user chose it (e.g. ``"--optim lomo"``)."""
    name = label or type(optimizer).__name__
    if gradient_accumulation_steps > 1:
        raise ValueError(
            f"DropGrad with {name} ({type(optimizer).__name__}): this optimizer updates the "
            "parameters inside every backward(), so with gradient_accumulation_steps="
            f"{gradient_accumulation_steps} there is no accumulated gradient to mask once per "
            "optimizer step. Use gradient_accumulation_steps=1."
        )
    if world_size > 1:
        raise ValueError(
            f"DropGrad with {name} ({type(optimizer).__name__}): an optimizer that updates "
            f"inside backward() is served in 1 process only (this run has {world_size}): "
            "its gradient hooks would run around the data-parallel reductions, which DropGrad "
            "does not make exact."
        )


def check_updates_the_model(dropgrad: DropGrad, model: torch.nn.Module | None) -> None:
    """At the start of training: refuse an optimizer whose ``step()`` cannot be what trains the
    model, because it holds none of the model's trainable parameters (a stand-in such as
    transformers' ``LayerWiseDummyOptimizer``: the updates happen elsewhere, in hooks or
    inside ``backward()``, where DropGrad would mask nothing while its rates are logged)."""
    if model is None or dropgrad.in_backward:
        return
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable:
        return
    held = [p for group in dropgrad.param_groups for p in group["params"]]
    if any(id(p) in trainable for p in held):
        return
    raise ValueError(
        f"The Trainer's optimizer ({type(dropgrad.optimizer).__name__}) holds none of the "
        "model's trainable parameters, so its step() is not what updates them: they are "
        "updated elsewhere (in gradient hooks or inside backward()), where DropGrad would mask "
        "nothing. DropGrad serves --optim *_layerwise, lomo and adalomo; for another optimizer "
        "that updates inside backward(), mask in its hooks with DropGrad(InBackward(...)) (see "
        "hf_dropgrad.in_backward)."
    )


def check_gradients_at_step(dropgrad: DropGrad) -> None:
    """At the first optimizer step: refuse a run in which no parameter DropGrad masks has a
    gradient when the optimizer steps although rates are positive: the gradients were consumed
    (and the parameters updated) before ``step()``, in hooks or inside ``backward()``."""
    if dropgrad.in_backward or not any(r > 0 for r in dropgrad.current_rates().values()):
        return
    if dropgrad.has_gradients():
        return
    raise RuntimeError(
        f"DropGrad found no gradient on any parameter it masks at the first optimizer step of "
        f"{type(dropgrad.optimizer).__name__}: the gradients were consumed before step(), so "
        "the optimizer updates the parameters elsewhere (in gradient hooks or inside "
        "backward()) from unmasked gradients. DropGrad serves --optim *_layerwise, lomo and "
        "adalomo; for another such optimizer, mask in its hooks with DropGrad(InBackward(...)) "
        "(see hf_dropgrad.in_backward)."
    )

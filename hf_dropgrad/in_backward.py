"""Optimizers that update the parameters inside ``backward()``: :class:`InBackward`.

Most optimizers update the parameters in ``step()``, after ``backward()``, and
``DropGrad.step()`` masks the gradients just before. Some update them *during* ``backward()``,
so any ``step()`` comes too late:

* one optimizer per parameter, each stepped in its parameter's post-accumulate-grad hook as
  soon as the gradient is ready: the Trainer's ``--optim *_layerwise`` (GaLore, APOLLO), and
  torch's "optimizer step in backward" recipe;
* LOMO and AdaLomo (``optimizer.fused_backward(loss, lr)``), which update each parameter from
  its gradient in hooks that run during ``backward()``.

:class:`InBackward` holds the parameters of such optimizers, in their order, as one
:class:`~torch.optim.Optimizer` whose ``step()`` updates nothing. ``DropGrad(InBackward(...))``
gives them positions, names and rates as it gives any optimizer's, so the masks are those of a
plain run over the same parameters; the gradients are masked where the updates read them:

* :meth:`DropGrad.parameter_step <hf_dropgrad.optimizer.DropGrad.parameter_step>` around one
  parameter's optimizer step, inside its hook;
* :meth:`DropGrad.register_mask_hooks <hf_dropgrad.optimizer.DropGrad.register_mask_hooks>`:
  each gradient masked as ``backward()`` accumulates it, before any later hook reads it (LOMO);

and ``DropGrad.step()``, called once ``backward()`` is done, ends the optimizer step (full
update drop's restore, the step count, the schedule).

An optimizer served this way from outside the Trainer's optimizer chain is marked with
:func:`mark_served`, so that ``get_dropgrad`` finds its ``DropGrad`` from the chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from hf_dropgrad.optimizer_hooks import init_optimizer_hooks

__all__ = ["InBackward", "mark_served", "served_by"]

_SERVED_BY = "_hf_dropgrad_served_by"


class InBackward(Optimizer):
    r"""The parameters of optimizers that update them inside ``backward()``, as one optimizer.

    Build ``DropGrad(InBackward(optimizers), ...)`` and mask where the updates read the
    gradients (see the module's documentation). ``param_groups`` are the optimizers' own groups
    (the same dicts, so a learning-rate schedule on one of them shows), in order: the positions
    of the parameters, which key the masks, are those of one optimizer built over all of them.

    Args:
        optimizers: ``{parameter: optimizer}`` (the layer-wise convention: one optimizer per
            parameter, in the order a plain optimizer would hold them), a sequence of
            optimizers, or one optimizer (LOMO: ``InBackward(lomo)``).

    ``step()`` updates nothing (it calls ``closure`` when given, whose ``backward()`` runs the
    updates); ``zero_grad()``, ``train()``, ``eval()``, ``state_dict()`` and
    ``load_state_dict()`` go to every optimizer.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> optimizers = {p: torch.optim.AdamW([p], lr=1e-3) for p in model.parameters()}
        >>> dropgrad = DropGrad(InBackward(optimizers), drop_rate=0.1, model=model)
        >>> def hook(p):
        ...     with dropgrad.parameter_step(p):
        ...         optimizers[p].step()
        ...     optimizers[p].zero_grad()
        >>> handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]
        >>> model(torch.randn(3, 4)).sum().backward()  # each parameter steps, its gradient masked
        >>> dropgrad.step()  # the optimizer step is done
    """

    def __init__(
        self, optimizers: Mapping[Any, Optimizer] | Iterable[Optimizer] | Optimizer
    ) -> None:
        # No super().__init__(): the groups and state are the optimizers' (as DropGrad's).
        if isinstance(optimizers, Optimizer):
            optimizers = [optimizers]
        elif isinstance(optimizers, Mapping):
            optimizers = list(optimizers.values())
        else:
            optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("InBackward needs at least one optimizer")
        for o in optimizers:
            if not isinstance(o, Optimizer):
                raise TypeError(
                    f"InBackward takes torch.optim.Optimizer instances, got {type(o).__name__}"
                )
        self.optimizers: list[Optimizer] = optimizers
        self._groups = [g for o in optimizers for g in o.param_groups]
        init_optimizer_hooks(self)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        raise AttributeError(
            "InBackward's param_groups are its optimizers' groups; change those optimizers"
        )

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        """The optimizers' states, merged (a new dict: read only)."""
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @state.setter
    def state(self, value: Any) -> None:
        raise AttributeError("InBackward's state is its optimizers'; change those optimizers")

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizers[0].defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizers[0].defaults = value

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Update nothing: the optimizers step inside ``backward()``. Returns ``closure()``
        (whose ``backward()`` runs them) when it is given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise TypeError(
            "InBackward holds the groups of its optimizers: add the group to one of them and "
            "build a new InBackward (and DropGrad) over them"
        )

    def train(self) -> None:
        for o in self.optimizers:
            fn = getattr(o, "train", None)
            if callable(fn):
                fn()

    def eval(self) -> None:
        for o in self.optimizers:
            fn = getattr(o, "eval", None)
            if callable(fn):
                fn()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"optimizers": [each optimizer's state dict]}``."""
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        states = state_dict.get("optimizers")
        if not isinstance(states, list | tuple) or len(states) != len(self.optimizers):
            raise ValueError(
                f"InBackward over {len(self.optimizers)} optimizers needs a state dict "
                '{"optimizers": [one state dict each]}, as its state_dict() gives'
            )
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        kinds = sorted({type(o).__name__ for o in self.optimizers})
        return f"InBackward({len(self.optimizers)} optimizers: {', '.join(kinds)})"


def mark_served(optimizer: Any, dropgrad: Any) -> None:
    """Record that ``dropgrad`` masks the gradients ``optimizer`` updates from inside
    ``backward()``, so that ``get_dropgrad`` finds it from a chain that holds ``optimizer``
    (the Trainer layer leaves such an optimizer in its chain, where Accelerate and the Trainer
    recognise it)."""
    setattr(optimizer, _SERVED_BY, dropgrad)


def served_by(optimizer: Any) -> Any:
    """The ``DropGrad`` :func:`mark_served` recorded for ``optimizer``, or ``None``."""
    return getattr(optimizer, _SERVED_BY, None)

"""Installing DropGrad into an optimizer chain: one entry point, :func:`install_dropgrad`.

A Trainer's optimizer is a chain: Accelerate's ``AcceleratedOptimizer`` around the optimizer
``--optim`` built, or DeepSpeed's ZeRO optimizer around its client optimizer. DropGrad goes in
as the innermost optimizer, so every wrapper (and the LR scheduler built on the outermost one)
keeps working. :func:`install_dropgrad` finds the ``DropGrad`` already in the chain or builds
one, and makes it exact under the engine that steps it, once per call:

* DeepSpeed ZeRO (:mod:`hf_dropgrad.integrations.deepspeed`): the ``DropGrad`` is ZeRO's client
  optimizer and masks ZeRO's flat partitions through the layout attached to it;
* Accelerate (:mod:`hf_dropgrad.integrations.accelerate`): under fp16 the wrapper's captured
  step method is re-captured, so GradScaler steps the ``DropGrad``;
* optimizers that update inside ``backward()`` (:mod:`hf_dropgrad.integrations.in_backward`:
  transformers' ``*_layerwise``, LOMO/AdaLomo): the chain is left as it is and the optimizer is
  served from beside it, the gradients masked in hooks; whoever drives the run calls
  ``dropgrad.step()`` after each optimizer step.

The Trainer layer calls it twice in a run: ``DropGradTrainer.create_optimizer`` on the bare
optimizer (nothing to attach yet), and ``DropGradCallback.on_train_begin`` on the prepared
chain (the engines exist). Transformers-free; imports the core and the integrations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from hf_dropgrad.integrations import accelerate as accelerate_integration
from hf_dropgrad.integrations import deepspeed as deepspeed_integration
from hf_dropgrad.integrations import in_backward as in_backward_integration
from hf_dropgrad.optimizer import DropGrad, get_dropgrad

__all__ = ["Installation", "install_dropgrad"]


class Installation(NamedTuple):
    """What :func:`install_dropgrad` did.

    Attributes:
        dropgrad: the ``DropGrad`` in the chain.
        built: whether ``build`` made it (else it was in the chain already).
        engine_steps: whether an engine (DeepSpeed ZeRO) steps it, inside ``backward()`` and
            once per partition group, advancing its step count itself.
        in_backward: whether it serves, from beside the chain, an optimizer that updates
            inside ``backward()`` (the chain's ``step()`` does not reach it): the caller calls
            ``dropgrad.step()`` after each optimizer step.
    """

    dropgrad: DropGrad
    built: bool
    engine_steps: bool
    in_backward: bool = False


def install_dropgrad(
    holder: Any, build: Callable[[torch.optim.Optimizer], DropGrad]
) -> Installation:
    """Put a ``DropGrad`` at the bottom of ``holder``'s optimizer chain, exact under its engine.

    Args:
        holder: an optimizer, or a chain of ``.optimizer`` wrappers (Accelerate's
            ``AcceleratedOptimizer``, DeepSpeed's ZeRO optimizer) around one.
        build: ``build(optimizer) -> DropGrad``, called only when the chain holds no
            ``DropGrad`` yet. Under ZeRO the optimizer's groups hold the model's parameters
            while it runs (ZeRO's flat partitions are put back afterwards).

    Returns:
        The :class:`Installation`. A ``DropGrad`` already in the chain (built by an earlier
        call, or passed through ``Trainer(optimizers=...)``) is kept.

    Raises:
        ValueError: the chain holds a DeepSpeed optimizer other than ZeRO-1/2/3, or (under
            ZeRO) DropGrad cannot map ZeRO's partitions back to the parameters, or an optimizer
            that updates inside ``backward()`` under DeepSpeed.
    """
    zero = deepspeed_integration.zero_optimizer(holder)
    stepper = in_backward_integration.find_in_backward(holder)
    if stepper is not None:
        if zero is not None:
            raise ValueError(
                f"DropGrad does not serve {type(stepper).__name__}, which updates inside "
                "backward(), under DeepSpeed"
            )
        dropgrad, built = in_backward_integration.install_in_backward(stepper, build)
        return Installation(dropgrad, built, engine_steps=False, in_backward=True)
    found = get_dropgrad(holder)
    if zero is not None:
        # ZeRO steps its client optimizer: wrap it if DropGrad is not in yet (a DeepSpeed
        # `optimizer` block, or DropGradCallback on a plain Trainer), and attach the layout.
        dropgrad = deepspeed_integration.install_under_deepspeed(zero, found, build)
        return Installation(dropgrad, found is None, engine_steps=True)
    if found is not None:
        return Installation(found, built=False, engine_steps=False)
    if not hasattr(holder, "optimizer"):
        return Installation(build(holder), built=True, engine_steps=False)
    parent = holder
    while hasattr(parent.optimizer, "optimizer"):
        parent = parent.optimizer
    # Swapping the innermost optimizer keeps every wrapper (and the LR scheduler built on
    # the outermost one) working: they reach param_groups and step() through it.
    dropgrad = build(parent.optimizer)
    parent.optimizer = dropgrad
    accelerate_integration.rebind_step(parent, dropgrad)  # fp16: GradScaler must step DropGrad
    return Installation(dropgrad, built=True, engine_steps=False)

"""The hooks of a ``torch.optim.Optimizer`` that shares another optimizer's groups and state."""

from __future__ import annotations

from collections import OrderedDict

from torch.optim import Optimizer

__all__ = ["init_optimizer_hooks"]


def init_optimizer_hooks(optimizer: Optimizer) -> None:
    r"""Set up what ``Optimizer.__init__`` sets up for hooks, and nothing else.

    :class:`~hf_dropgrad.optimizer.DropGrad` and :class:`~hf_dropgrad.in_backward.InBackward`
    are optimizers that cannot call ``Optimizer.__init__``: it would give them
    ``param_groups``, ``state`` and ``defaults`` of their own, while LR schedulers,
    ``GradScaler`` and Accelerate must see the wrapped optimizers'. torch has no public way to
    set up only the hooks: the public ``register_step_pre_hook`` & co. need these dicts, and
    the private ``_patch_step_function`` (checked against torch 2.13) wraps ``step()`` so that
    hooks run and LR schedulers see the step counter they check.

    Args:
        optimizer (Optimizer): the optimizer being built, from its ``__init__``.
    """
    optimizer._optimizer_step_pre_hooks = OrderedDict()
    optimizer._optimizer_step_post_hooks = OrderedDict()
    optimizer._optimizer_state_dict_pre_hooks = OrderedDict()
    optimizer._optimizer_state_dict_post_hooks = OrderedDict()
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()
    optimizer._optimizer_load_state_dict_post_hooks = OrderedDict()
    optimizer._patch_step_function()

"""``DropGradCallback``: DropGrad for any ``Trainer``, and the one place that installs it.

``DropGradTrainer`` is a ``Trainer`` with this callback in front; every other ``Trainer``
subclass (TRL's, your own) gets the same behaviour from ``trainer.add_callback(...)``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState
from transformers.training_args import TrainingArguments
from transformers.utils import logging

from hf_dropgrad import engines
from hf_dropgrad.optimizer import DropGrad, get_dropgrad
from hf_dropgrad.training_args import DropGradConfig

logger = logging.get_logger(__name__)

__all__ = ["DropGradCallback", "check_supported_setup", "install_dropgrad"]

#: Prefix of the keys DropGrad adds to the Trainer's logs.
LOG_KEY = "dropgrad_rate"


def check_supported_setup(args: TrainingArguments, accelerator: Any = None) -> None:
    """Refuse the setups where DropGrad cannot be exact, before training starts.

    FSDP2 and DeepSpeed ZeRO-1/2/3 are exact; FSDP1 and DeepSpeed's fp16/bf16 optimizer
    without ZeRO are refused. See [`hf_dropgrad.engines.check_supported_setup`].
    """
    engines.check_supported_setup(args, accelerator)


def install_dropgrad(
    holder: Any,
    model: torch.nn.Module | None,
    config: DropGradConfig,
    num_training_steps: int | None,
) -> DropGrad:
    """Wrap the optimizer inside ``holder`` (an optimizer or a chain of ``.optimizer``
    wrappers such as Accelerate's ``AcceleratedOptimizer``) in a ``DropGrad``.

    Returns the ``DropGrad`` already in the chain when there is one, so installing twice,
    or a ``DropGrad`` passed through ``Trainer(optimizers=...)``, is fine.
    """
    found = get_dropgrad(holder)
    kwargs = config.dropgrad_kwargs(num_training_steps)
    zero = engines.zero_optimizer(holder)
    if zero is not None:  # DeepSpeed ZeRO: DropGrad must be (or wrap) the optimizer ZeRO steps
        return engines.install_under_deepspeed(
            zero, found, lambda optimizer: DropGrad(optimizer, model=model, **kwargs)
        )
    if found is not None:
        return found
    if not hasattr(holder, "optimizer"):
        return DropGrad(holder, model=model, **kwargs)
    parent = holder
    while hasattr(parent.optimizer, "optimizer"):
        parent = parent.optimizer
    # Swapping the innermost optimizer keeps every wrapper (and the LR scheduler built on
    # the outermost one) working: they reach param_groups and step() through it.
    dropgrad = DropGrad(parent.optimizer, model=model, **kwargs)
    parent.optimizer = dropgrad
    if hasattr(parent, "_optimizer_patched_step_method"):
        # Under fp16, AcceleratedOptimizer swaps in a step method it captured from the old
        # optimizer when it was built; without re-capturing, GradScaler would call the
        # inner optimizer's step and skip the masks.
        from accelerate.optimizer import patch_optimizer_step

        parent._optimizer_original_step_method = dropgrad.step
        parent._optimizer_patched_step_method = patch_optimizer_step(parent, dropgrad.step)
    return dropgrad


class DropGradCallback(TrainerCallback):
    """Brings DropGrad to any [`Trainer`] without changing its class.

    At the start of training the callback wraps the Trainer's optimizer (whatever `--optim`
    built, or the one passed through `optimizers=`) in a [`DropGrad`], prints which
    parameters got which rate, and then, before every optimizer step, sets DropGrad's step
    to `state.global_step` (so masks and schedules resume exactly) and adds the current
    rates to every training log (`dropgrad_rate`, `dropgrad_rate/<pattern>`).

    Settings left unset are read from the `dropgrad_*` fields of the Trainer's arguments
    when they are [`DropGradTrainingArguments`], else take their defaults; the seed
    defaults to `args.seed`.

    Args:
        drop_rate (`float`, *optional*): rate of parameters no `module_rates` pattern matches.
        module_rates (`dict[str, float]` or `str`, *optional*): `{"encoder": 0.1, ...}`.
        scheduler (`str`, *optional*): `"constant"`, `"linear"`, `"cosine"` or `"step"`.
        final_rate, scheduler_steps, step_size, gamma, full_update_drop, seed: as the
            `dropgrad_*` arguments of [`DropGradTrainingArguments`].

    Example:

    ```python
    trainer = MyTrainer(model=model, args=args, train_dataset=ds)
    trainer.add_callback(DropGradCallback(module_rates={"encoder": 0.1, "decoder": 0.2}))
    trainer.train()
    ```
    """

    def __init__(self, **settings: Any) -> None:
        DropGradConfig(**settings)  # validate now, not at the first step
        self._settings = settings
        self.dropgrad: DropGrad | None = None
        self._engine_steps = False

    @classmethod
    def from_args(cls, args: TrainingArguments) -> DropGradCallback:
        """The callback for the `dropgrad_*` fields of `args`."""
        return cls(**DropGradConfig.from_args(args).__dict__)

    def config(self, args: TrainingArguments) -> DropGradConfig:
        """The settings for a run with `args`."""
        return DropGradConfig.from_args(args, **self._settings)

    def validate(self, model: torch.nn.Module, args: TrainingArguments) -> None:
        """Check the settings against `model` now (patterns that match nothing, ...)."""
        config = self.config(args)
        check_supported_setup(args)
        if config.module_rates:
            from hf_dropgrad.patterns import resolve_pattern_rates

            trainable = [
                (n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad
            ]
            resolve_pattern_rates(trainable, config.module_rates, argument="dropgrad_module_rates")

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._move_to_front()
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise ValueError("DropGradCallback found no optimizer at the start of training")
        check_supported_setup(args, getattr(optimizer, "accelerator_state", None))
        self.dropgrad = install_dropgrad(
            optimizer, kwargs.get("model"), self.config(args), state.max_steps or None
        )
        engines.check_parameters(self.dropgrad)  # e.g. tensor-parallel placements
        # DeepSpeed steps inside backward(), before on_pre_optimizer_step fires.
        self._engine_steps = engines.zero_optimizer(optimizer) is not None
        self.dropgrad.set_step(state.global_step)
        if state.is_world_process_zero:
            print(f"DropGrad rates (step {state.global_step}):\n{self.dropgrad.describe()}")

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Under DeepSpeed the step happens inside backward(): the key must be set before it.
        if self.dropgrad is not None:
            self.dropgrad.set_step(state.global_step)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Gradients are clipped before this event, so max_grad_norm sees unmasked gradients.
        # Under DeepSpeed the step is already done (and counted) by now.
        if self.dropgrad is not None and not self._engine_steps:
            self.dropgrad.set_step(state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.dropgrad is None or logs is None or not ({"loss", "train_loss"} & set(logs)):
            return
        rates = self.log_entries()
        logs.update(rates)  # seen by the callbacks after this one: console, TensorBoard, W&B
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(rates)

    def log_entries(self) -> dict[str, float]:
        """`{"dropgrad_rate": r, "dropgrad_rate/<pattern>": r, ...}` for the next step."""
        assert self.dropgrad is not None
        out = {}
        for label, rate in self.dropgrad.rate_groups().items():
            out[LOG_KEY if label == "default" else f"{LOG_KEY}/{label}"] = rate
        return out

    def _move_to_front(self) -> None:
        # The reporting callbacks (console, TensorBoard, W&B) only see the rates added to
        # `logs` if this callback runs before them; `add_callback` appends at the end. A new
        # list leaves the loop that is calling us untouched.
        handler = sys._getframe(2).f_locals.get("self")
        if isinstance(handler, CallbackHandler) and handler.callbacks[0] is not self:
            handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]

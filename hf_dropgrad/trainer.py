"""``DropGradTrainer`` and ``DropGradSeq2SeqTrainer``: Trainers with DropGrad built in."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Seq2SeqTrainer, Trainer

from hf_dropgrad import compat  # refuses unsupported transformers/accelerate at import
from hf_dropgrad.callbacks import DropGradCallback
from hf_dropgrad.integrations.in_backward import kind_of
from hf_dropgrad.settings import ARG_FIELDS, keyword_names

__all__ = ["DropGradSeq2SeqTrainer", "DropGradTrainer"]

_SETTING_OF_ARG = {arg: key for key, arg in ARG_FIELDS.items()}


class _DropGradMixin:
    """Attaches a [`DropGradCallback`] in front of the Trainer's callbacks.

    Everything DropGrad does in a Trainer lives in that callback, so `DropGradTrainer` and
    `DropGradCallback(...).attach(trainer)` on any other Trainer behave the same.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = {_SETTING_OF_ARG[name]: kwargs.pop(name) for name in list(kwargs)
                    if name in _SETTING_OF_ARG}
        names = keyword_names(type(self).__name__, prefixed=True)
        callback = DropGradCallback(names=names, **settings)  # bad values fail here
        super().__init__(*args, **kwargs)
        self._dropgrad_num_training_steps: int | None = None
        # Bad patterns, or settings next to a DropGrad passed via optimizers=, fail here.
        self.dropgrad_callback = callback.attach(self)

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """As `Trainer`'s; `num_training_steps` is also the default length of a DropGrad
        `linear`/`cosine` schedule when this is called before `train()`."""
        self._dropgrad_num_training_steps = num_training_steps
        super().create_optimizer_and_scheduler(num_training_steps)  # type: ignore[misc]

    def create_optimizer(self, model: Any = None) -> Any:
        """Build the optimizer as `Trainer` does, then wrap it in a [`DropGrad`].

        Wrapping here, before `accelerator.prepare`, lets Accelerate see the `DropGrad`.
        The default length of a schedule is the run's total number of optimizer steps:
        `state.max_steps` during `train()`, else the `num_training_steps` given to
        `create_optimizer_and_scheduler`, else `--max_steps`.
        """
        optimizer = compat.call_create_optimizer(super().create_optimizer, model)  # type: ignore[misc]
        # Not DeepSpeed's DummyOptim; not an optimizer that updates inside backward() (--optim
        # *_layerwise, lomo), which the LR scheduler and Accelerate must see as it is: the
        # callback serves it from beside the chain at on_train_begin.
        if isinstance(optimizer, torch.optim.Optimizer) and kind_of(optimizer) is None:
            args = self.args  # type: ignore[attr-defined]
            steps = (
                self.state.max_steps  # type: ignore[attr-defined]
                or self._dropgrad_num_training_steps
                or (args.max_steps if args.max_steps > 0 else None)
            )
            opt_model = self.model if model is None else model  # type: ignore[attr-defined]
            self.dropgrad_callback.install(optimizer, opt_model, args, steps)
            if self.dropgrad_callback.dropgrad is not optimizer:
                optimizer = self.dropgrad_callback.dropgrad
            self.optimizer = optimizer
        return optimizer


class DropGradTrainer(_DropGradMixin, Trainer):
    """A [`Trainer`] that trains with DropGrad.

    It wraps whatever optimizer the Trainer builds (`--optim adamw_torch`, `adafactor`,
    `sgd`, ...) or receives through `optimizers=(optimizer, scheduler)` in a [`DropGrad`]
    at the start of training; every other Trainer option works as usual. Settings come from
    the `dropgrad_*` fields of [`DropGradTrainingArguments`], or, with a plain
    [`TrainingArguments`], from keyword arguments with the same names
    (`DropGradTrainer(model, args, dropgrad_rate=0.1, dropgrad_module_rates={...})`),
    which take precedence over the arguments' fields. Keyword arguments take numbers as
    numbers: a numeric string (`dropgrad_rate="0.1"`) still works with a `FutureWarning` and
    becomes a `TypeError` in 0.3.0 (text is read by the arguments classes: command line,
    JSON/YAML config files).

    A [`DropGrad`] passed through `optimizers=` is used as it is; DropGrad settings must then
    stay at their defaults (a `ValueError` names those that are set), since they would be
    silently ignored.

    The rates each step used are added to the training logs (`dropgrad_rate`,
    `dropgrad_rate/<pattern>`), as `learning_rate` is, and a table of the rates is logged
    when training starts. With DropGrad off (rate 0, no module rates) training and logs are
    those of [`Trainer`]; what differs is one more callback, a [`DropGradCallback`], first in
    `trainer.callback_handler.callbacks`, and DropGrad's small `dropgrad` entry in
    `optimizer.pt`. Masks follow `state.global_step`, so `resume_from_checkpoint` continues
    exactly.

    Example:

    ```python
    args = DropGradTrainingArguments("out", dropgrad_module_rates="encoder=0.1,decoder=0.2")
    trainer = DropGradTrainer(model=model, args=args, train_dataset=train_ds)
    trainer.train()
    ```
    """


class DropGradSeq2SeqTrainer(_DropGradMixin, Seq2SeqTrainer):
    """A [`Seq2SeqTrainer`] that trains with DropGrad; see [`DropGradTrainer`].

    Use it with [`DropGradSeq2SeqTrainingArguments`] (or a plain
    [`Seq2SeqTrainingArguments`] plus `dropgrad_*` keyword arguments).
    """

"""``DropGradTrainer`` and ``DropGradSeq2SeqTrainer``: Trainers with DropGrad built in."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Seq2SeqTrainer, Trainer

from hf_dropgrad.callbacks import DropGradCallback, install_dropgrad
from hf_dropgrad.training_args import _ARG_NAMES

__all__ = ["DropGradSeq2SeqTrainer", "DropGradTrainer"]

_SETTING_OF_ARG = {arg: key for key, arg in _ARG_NAMES.items()}


class _DropGradMixin:
    """Installs a [`DropGradCallback`] in front of the Trainer's callbacks.

    Everything DropGrad does in a Trainer lives in that callback, so `DropGradTrainer` and
    `trainer.add_callback(DropGradCallback(...))` on any other Trainer behave the same.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = [name for name in kwargs if name in _SETTING_OF_ARG]
        settings = {_SETTING_OF_ARG[name]: kwargs.pop(name) for name in names}
        super().__init__(*args, **kwargs)
        self.dropgrad_callback = DropGradCallback(**settings)
        self.dropgrad_callback.validate(self.model, self.args)  # bad patterns fail here
        self.callback_handler.callbacks.insert(0, self.dropgrad_callback)

    def create_optimizer(self, model: Any = None) -> Any:
        """Build the optimizer as `Trainer` does, then wrap it in a [`DropGrad`].

        Wrapping here, before `accelerator.prepare`, lets Accelerate see the `DropGrad`;
        `state.max_steps` is already the run's total number of optimizer steps.
        """
        optimizer = super().create_optimizer(model)  # type: ignore[misc]
        if isinstance(optimizer, torch.optim.Optimizer):  # not DeepSpeed's DummyOptim
            config = self.dropgrad_callback.config(self.args)  # type: ignore[attr-defined]
            opt_model = self.model if model is None else model  # type: ignore[attr-defined]
            steps = self.state.max_steps or None  # type: ignore[attr-defined]
            optimizer = install_dropgrad(optimizer, opt_model, config, steps)
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
    which take precedence over the arguments' fields.

    The current rates are added to every training log (`dropgrad_rate`,
    `dropgrad_rate/<pattern>`) and a table of the rates is printed when training starts.
    Masks follow `state.global_step`, so `resume_from_checkpoint` continues exactly.

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

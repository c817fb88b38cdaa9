"""``DropGradCallback``: DropGrad for any ``Trainer``, driven by the Trainer's events.

``DropGradTrainer`` is a ``Trainer`` with this callback in front; every other ``Trainer``
subclass (TRL's, your own) gets the same behaviour from ``DropGradCallback(...).attach(trainer)``.
The settings are :mod:`hf_dropgrad.settings`'; putting DropGrad into the optimizer chain is
:func:`hf_dropgrad.install.install_dropgrad`.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import TrainerControl, TrainerState
from transformers.training_args import TrainingArguments
from transformers.utils import logging

import hf_dropgrad.compat  # noqa: F401  (refuses unsupported transformers/accelerate)
from hf_dropgrad import install as installing
from hf_dropgrad import model_card, resume, run_config
from hf_dropgrad.integrations import in_backward
from hf_dropgrad.integrations.accelerate import check_supported_setup
from hf_dropgrad.integrations.fsdp import check_parameters
from hf_dropgrad.optimizer import DropGrad, get_dropgrad
from hf_dropgrad.settings import (
    ARG_FIELDS,
    DropGradSettings,
    GivenSettings,
    keyword_names,
    setting_names,
    warn_numbers_given_as_text,
    warn_unused,
)

# A child of transformers' library logger: the Trainer sets that logger's level from
# --log_level (main process) and --log_level_replica (the others), and its handler prints.
logger = logging.get_logger("transformers.hf_dropgrad")

__all__ = ["DropGradCallback", "check_supported_setup", "install_dropgrad"]

#: Prefix of the keys DropGrad adds to the Trainer's logs.
LOG_KEY = "dropgrad_rate"

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # hf_dropgrad/


def install_dropgrad(
    holder: Any, model: torch.nn.Module | None, settings: DropGradSettings, steps: int | None
) -> DropGrad:
    """Deprecated (0.1.0's installer): use [`hf_dropgrad.install.install_dropgrad`]."""
    from hf_dropgrad.deprecated import warn_deprecated

    warn_deprecated("hf_dropgrad.callbacks.install_dropgrad(holder, model, settings, steps)")

    def build(optimizer: torch.optim.Optimizer) -> DropGrad:
        return DropGrad(optimizer, model=model, **settings.dropgrad_kwargs(steps))

    return installing.install_dropgrad(holder, build).dropgrad


def _user_stacklevel() -> int:
    """The `stacklevel` with which the caller's `warnings.warn` points at the user's line: the
    first frame outside hf_dropgrad (DropGradCallback(...), DropGradTrainer(...), a subclass)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


class DropGradCallback(TrainerCallback):
    """Brings DropGrad to any [`Trainer`] without changing its class.

    At the start of training the callback wraps the Trainer's optimizer (whatever `--optim`
    built, or the one passed through `optimizers=`) in a [`DropGrad`] and logs which
    parameters got which rate (through transformers' logging: `--log_level`). Before every
    optimizer step it sets DropGrad's step to `state.global_step` (so masks and schedules
    resume exactly), and it adds the rates that step used to the training logs
    (`dropgrad_rate`, `dropgrad_rate/<pattern>`), as the Trainer logs `learning_rate`. With
    DropGrad off (rate 0, no module rates) it adds nothing: the logs are the plain Trainer's.

    Settings left unset are read from the `dropgrad_*` fields of the Trainer's arguments
    when they are [`DropGradTrainingArguments`], else take their defaults; the seed
    defaults to `args.seed`. Messages name each setting as it was given
    (`DropGradCallback(module_rates=...)`, `--dropgrad_rate`). Numbers are given as numbers:
    a numeric string is deprecated here (text is read on the command line and in config
    files, by the arguments classes).

    A `DropGrad` the Trainer already holds (passed through `optimizers=`) is used as it is:
    then no DropGrad setting may be given (a `ValueError` names those that are), and its
    parameters are named after the model in the rate table and the logs.

    Order matters: the reporting callbacks (console, TensorBoard, W&B) only see the rates if
    this callback runs before them, and `trainer.add_callback` appends at the end. Use
    [`~DropGradCallback.attach`], which puts the callback first and checks the settings
    against the model at once (with `add_callback`, `state.log_history` still has the rates,
    and a warning says so).

    Args:
        drop_rate (`float`, *optional*): rate of parameters no `module_rates` pattern matches.
        module_rates (`dict[str, float]` or `str`, *optional*): `{"encoder": 0.1, ...}`, or
            the `PATTERN=RATE` text of `--dropgrad_module_rates`.
        scheduler (`str`, *optional*): `"constant"`, `"linear"`, `"cosine"` or `"step"`.
        final_rate, scheduler_steps, step_size, gamma, full_update_drop, seed: as the
            `dropgrad_*` arguments of [`DropGradTrainingArguments`].
        names (`dict[str, str]`, *optional*, keyword-only): how messages name each setting,
            for integrations that take them under other spellings
            (`hf_dropgrad.settings.keyword_names`). Defaults to this class's keywords.

    Example:

    ```python
    trainer = MyTrainer(model=model, args=args, train_dataset=ds)
    DropGradCallback(module_rates={"encoder": 0.1, "decoder": 0.2}).attach(trainer)
    trainer.train()
    ```
    """

    def __init__(self, *, names: Mapping[str, str] | None = None, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(ARG_FIELDS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown setting(s) {unknown}; expected one of "
                f"{list(ARG_FIELDS)}."
            )
        names = dict(names) if names is not None else keyword_names(type(self).__name__)
        self._given = GivenSettings(settings, names)  # bad values fail here, not at step 1
        entered, level = self._given.entered(), _user_stacklevel()
        warn_numbers_given_as_text(settings, names, stacklevel=level, only=entered)
        warn_unused(self._given.validated.values(), names, stacklevel=level, only=entered)
        self._checked: tuple[Any, DropGradSettings] | None = None  # model, settings checked
        self.dropgrad: DropGrad | None = None
        self._engine_steps = False  # DeepSpeed steps inside backward(), keyed at on_step_begin
        self._in_backward = False  # served beside the chain: this callback calls its step()
        self._check_gradients = False  # at the first optimizer step of train()
        self._built = False  # whether this callback built the DropGrad (else: the user's)
        self._built_steps: int | None = None
        self._attached = False
        self._log_rates = False
        self._used_rates: dict[str, float] | None = None
        self._run_record: tuple[DropGradSettings, dict[str, Any]] | None = None  # as trained

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], names: Mapping[str, str]
    ) -> DropGradCallback:
        """`DropGradCallback(names=names, **settings)`: the callback for `settings` (by the
        names of `__init__`), whose messages name each setting as `names` says (e.g.
        `{"drop_rate": "DropGradTrainer(dropgrad_rate=...)", ...}`)."""
        return cls(names=names, **settings)

    @classmethod
    def from_args(cls, args: TrainingArguments) -> DropGradCallback:
        """The callback for the `dropgrad_*` fields of `args` (messages name their flags)."""
        names = setting_names(args, (), keyword_names(cls.__name__))
        return cls(names=names, **DropGradSettings.from_args(args).values())

    def settings(self, args: TrainingArguments) -> DropGradSettings:
        """The settings for a run with `args`: this callback's, then `args`' `dropgrad_*`.

        Built and validated once per `args` (again only if its `dropgrad_*` fields or seed
        change)."""
        return self._given.resolve(args)[0]

    def config(self, args: TrainingArguments) -> DropGradSettings:
        """Deprecated (0.1.0's name): use [`~DropGradCallback.settings`]."""
        from hf_dropgrad.deprecated import warn_deprecated

        warn_deprecated("DropGradCallback.config(args)")
        return self.settings(args)

    def attach(self, trainer: Any) -> DropGradCallback:
        """Put this callback in front of `trainer`'s callbacks, checking its settings now.

        In front, it adds the rates to a log before the reporting callbacks (console,
        TensorBoard, W&B) see it. The settings are checked against `trainer.model` (patterns
        that match nothing, or only frozen parameters) and against a `DropGrad` the Trainer
        already holds, so mistakes fail before training. Returns the callback.
        """
        if get_dropgrad(getattr(trainer, "optimizer", None)) is not None:
            self._check_no_settings(trainer.args)
        else:
            self.validate(trainer.model, trainer.args)
        handler = trainer.callback_handler
        handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]
        self._attached = True
        self._record_in(trainer)
        return self

    def validate(self, model: torch.nn.Module | None, args: TrainingArguments) -> None:
        """Check the settings against `model` now (patterns that match nothing, ...)."""
        check_supported_setup(args)
        settings, names = self._given.resolve(args)
        checked = self._checked
        if checked is not None and checked[0] is model and checked[1] is settings:
            return  # attach() checked this model with these settings already
        settings.check_model(model, names)
        self._checked = (model, settings)

    def install(
        self,
        optimizer: Any,
        model: torch.nn.Module | None,
        args: TrainingArguments,
        num_training_steps: int | None,
    ) -> DropGrad:
        """Wrap `optimizer` (or the optimizer inside its wrappers) in a `DropGrad`, once, and
        make it exact under the engine that steps it ([`hf_dropgrad.install.install_dropgrad`]).

        A `DropGrad` already in the chain is kept: this callback's own, or the user's, which
        must then come without DropGrad settings. `num_training_steps` is the default length
        of a `linear`/`cosine` schedule.
        """
        settings, names = self._given.resolve(args)
        stepper = in_backward.find_in_backward(optimizer)
        if stepper is not None:  # before any hook is registered
            in_backward.check_in_backward_run(
                stepper, args.gradient_accumulation_steps, args.world_size,
                f"--optim {getattr(args.optim, 'value', args.optim)}",
            )
        found = get_dropgrad(optimizer)
        if found is None:
            self.validate(model, args)  # errors name the settings as given
        elif found is not self.dropgrad:
            self._check_no_settings(args)

        def build(inner: torch.optim.Optimizer) -> DropGrad:
            kwargs = settings.dropgrad_kwargs(num_training_steps, names)
            return DropGrad(inner, model=model, **kwargs)

        installed = installing.install_dropgrad(optimizer, build)
        if installed.built:
            # This callback built it, for this many steps: on resume it re-applies the settings.
            self._built, self._built_steps = True, num_training_steps
            self._log_rates = settings.enabled
        elif installed.dropgrad is not self.dropgrad:  # the user's, passed through optimizers=
            if model is not None:
                installed.dropgrad.name_parameters(model)
            self._log_rates = True
        self.dropgrad, self._engine_steps = installed.dropgrad, installed.engine_steps
        self._in_backward = installed.in_backward
        return installed.dropgrad

    def _check_no_settings(self, args: TrainingArguments) -> None:
        settings, names = self._given.resolve(args)
        given = settings.given_names(names)
        if given:
            raise ValueError(
                "The Trainer's optimizer already is a DropGrad (passed through optimizers=), and "
                f"DropGrad settings were given too: {', '.join(given)}. A DropGrad you pass is "
                "used as it is, so these settings would be silently ignored. Leave them at their "
                "defaults, or pass the bare optimizer and let the settings build the DropGrad."
            )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise ValueError("DropGradCallback found no optimizer at the start of training")
        check_supported_setup(args, getattr(optimizer, "accelerator_state", None))
        # The engines exist now (Accelerate prepared, DeepSpeed initialised): each is attached
        # here, once.
        dropgrad = self.install(optimizer, kwargs.get("model"), args, state.max_steps or None)
        check_parameters(dropgrad)  # e.g. tensor-parallel placements
        if not (self._engine_steps or self._in_backward):
            # An optimizer whose step() cannot be what trains the model (its updates happen in
            # hooks or inside backward()) fails here, not after a run that logs unapplied rates.
            in_backward.check_updates_the_model(dropgrad, kwargs.get("model"))
            self._check_gradients = True
        if not self._engine_steps:
            # A forced HF_DROPGRAD_BACKEND that cannot take a parameter (its device or dtype)
            # fails here, before the first forward pass, now that the parameters sit on their
            # device. (Under ZeRO the partitions DropGrad masks appear at the step, which
            # checks them before touching anything.)
            dropgrad.check_backend()
        self._apply_run_settings(args, state)
        self._record_in_run(args, kwargs.get("model"))
        dropgrad.set_step(state.global_step)
        self._used_rates = None
        if not self._log_rates:
            return
        if not self._attached:
            logger.warning(
                "DropGradCallback was added with add_callback() (or callbacks=), after the "
                "callbacks that report logs, so the console, TensorBoard and W&B will not show "
                "the dropgrad_rate entries (state.log_history has them). Use "
                "DropGradCallback(...).attach(trainer) instead."
            )
        main = getattr(args, "should_log", state.is_world_process_zero)
        passive = getattr(args, "log_level", "passive") == "passive"
        level = pylogging.WARNING if main and passive else pylogging.INFO
        logger.log(level, "DropGrad rates (step %d):\n%s", state.global_step, dropgrad.describe())

    def _apply_run_settings(self, args: TrainingArguments, state: TrainerState) -> None:
        """This run's settings apply from the resumed step on, recorded in trainer_state.json
        ([`hf_dropgrad.resume`]); a warning says which differ from the checkpoint's. A
        `DropGrad` passed through `optimizers=` is left as loaded (it comes with no settings).
        """
        dropgrad = self.dropgrad
        if dropgrad is None or not self._built:
            return
        settings, names = self._given.resolve(args)
        steps = self._built_steps or state.max_steps or None
        record, changes = resume.apply_run_settings(dropgrad, settings, names, state, steps)
        self._run_record = (settings, record)
        if changes and getattr(args, "should_log", state.is_world_process_zero):
            logger.warning(
                "Resuming at step %d with DropGrad settings that differ from the checkpoint's; "
                "this run's apply from step %d on (the steps already taken keep their masks): %s",
                state.global_step, state.global_step, "; ".join(changes),
            )

    def run_record(
        self, args: TrainingArguments, optimizer: Any = None
    ) -> dict[str, Any] | None:
        """The DropGrad settings of a run with `args` as the model card and the experiment
        trackers record them, or `None` with DropGrad off (rate 0, no module rates).

        That is the record the run keeps in `trainer_state.json`
        ([`DropGradSettings.to_record`]: the seed and a schedule's length resolved) once
        training started; before, the same record for `args`. For a `DropGrad` passed through
        `optimizers=` (this callback's, or found in `optimizer`), what it says of its own
        settings ([`hf_dropgrad.run_config.record_of_dropgrad`]).
        """
        users = self.dropgrad if self.dropgrad is not None else get_dropgrad(optimizer)
        if users is not None and not self._built:
            return run_config.record_of_dropgrad(users)
        settings, names = self._given.resolve(args)
        if not settings.enabled:
            return None
        if self._run_record is not None and self._run_record[0] == settings:
            return self._run_record[1]
        max_steps = getattr(args, "max_steps", -1)
        steps = self._built_steps or (max_steps if max_steps > 0 else None)
        return run_config.record_before_training(settings, names, steps)

    def _record_in(self, trainer: Any) -> None:
        """Let `trainer`'s model card and its run configuration (what the trackers log) say
        what DropGrad did ([`hf_dropgrad.model_card`], [`hf_dropgrad.run_config`])."""
        model_card.hook_create_model_card(
            trainer, lambda: self.run_record(trainer.args, getattr(trainer, "optimizer", None))
        )
        self._record_in_run(trainer.args, None)

    def _record_in_run(self, args: TrainingArguments, model: Any) -> None:
        # With DropGrad off, nothing: the arguments and the model stay the plain Trainer's.
        if self.run_record(args) is not None:
            run_config.add_to_run_config(args, lambda: self.run_record(args))
            if model is not None:
                model_card.tag_model(model)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Set the key as early as the step is known: engines that step inside backward()
        # (DeepSpeed) need it before on_pre_optimizer_step.
        self._begin_step(state.global_step)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Gradients are clipped before this event, so max_grad_norm sees unmasked gradients.
        # Under DeepSpeed the step already ran (and was counted) inside backward().
        if not self._engine_steps:
            self._begin_step(state.global_step)
        if self._check_gradients and self.dropgrad is not None:
            self._check_gradients = False
            in_backward.check_gradients_at_step(self.dropgrad)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # An optimizer that updates inside backward() is served beside the chain, whose step()
        # does not reach the DropGrad: end its step here (full update drop's restore, the count).
        if self._in_backward and self.dropgrad is not None:
            self.dropgrad.step()

    def _begin_step(self, step: int) -> None:
        """Make DropGrad's next step be `step`, and remember the rates it uses for its log."""
        if self.dropgrad is not None:
            self.dropgrad.set_step(step)
            if self._log_rates:
                self._used_rates = self.log_entries()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._log_rates or self.dropgrad is None or logs is None:
            return
        if not ({"loss", "train_loss"} & set(logs)):
            return
        rates = self._used_rates if self._used_rates is not None else self.log_entries()
        logs.update(rates)  # seen by the callbacks after this one: console, TensorBoard, W&B
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(rates)

    def log_entries(self) -> dict[str, float]:
        """`{"dropgrad_rate": r, "dropgrad_rate/<pattern>": r, ...}` for DropGrad's next step."""
        assert self.dropgrad is not None
        out = {}
        for label, rate in self.dropgrad.rate_groups().items():
            out[LOG_KEY if label == "default" else f"{LOG_KEY}/{label}"] = rate
        return out

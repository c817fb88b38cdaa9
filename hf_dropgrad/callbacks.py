"""``DropGradCallback``: DropGrad for any ``Trainer``, and the one place that installs it.

``DropGradTrainer`` is a ``Trainer`` with this callback in front; every other ``Trainer``
subclass (TRL's, your own) gets the same behaviour from ``DropGradCallback(...).attach(trainer)``.
"""

from __future__ import annotations

import logging as pylogging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import TrainerControl, TrainerState
from transformers.training_args import TrainingArguments
from transformers.utils import logging

import hf_dropgrad.compat  # noqa: F401  (refuses unsupported transformers/accelerate)
from hf_dropgrad.integrations import accelerate as accelerate_integration
from hf_dropgrad.integrations import deepspeed as deepspeed_integration
from hf_dropgrad.integrations.fsdp import check_parameters
from hf_dropgrad.optimizer import DropGrad, get_dropgrad
from hf_dropgrad.patterns import resolve_pattern_rates
from hf_dropgrad.settings import ARG_FIELDS, DropGradSettings, keyword_names, warn_unused

# A child of transformers' library logger: the Trainer sets that logger's level from
# --log_level (main process) and --log_level_replica (the others), and its handler prints.
logger = logging.get_logger("transformers.hf_dropgrad")

__all__ = ["DropGradCallback", "check_supported_setup", "install_dropgrad"]

#: Prefix of the keys DropGrad adds to the Trainer's logs.
LOG_KEY = "dropgrad_rate"

#: Key of DropGrad's entry in `TrainerState.stateful_callbacks`, which every checkpoint saves in
#: its trainer_state.json: the settings the run trained with, compared with a resumed run's.
#: (Not a callback's class name, so `restore_callback_states_from_checkpoint` leaves it alone.)
RECORD_KEY = "hf_dropgrad"


def settings_record(settings: DropGradSettings, num_training_steps: int | None) -> dict[str, Any]:
    """The settings a run trains with, as plain data (JSON): the run-dependent defaults resolved
    (the seed, a schedule's length) and the settings its schedule ignores left out."""
    values = settings.values()
    record = {key: values[key] for key in
              ("drop_rate", "module_rates", "scheduler", "full_update_drop", "seed")}
    if settings.scheduler in ("linear", "cosine"):
        record["final_rate"] = settings.final_rate
        record["scheduler_steps"] = settings.num_scheduler_steps(num_training_steps)
    elif settings.scheduler == "step":
        record["step_size"] = settings.step_size
        record["gamma"] = settings.gamma
    return record


def _shown(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v:g}" for k, v in value.items()) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def changed_settings(
    previous: Mapping[str, Any], current: Mapping[str, Any], names: Mapping[str, str]
) -> list[str]:
    """`"<name> <old> -> <new>"` for each setting both records hold that differs."""
    return [
        f"{names[key]} {_shown(previous[key])} -> {_shown(current[key])}"
        for key in current
        if key in previous and previous[key] != current[key]
    ]


def check_supported_setup(args: TrainingArguments, accelerator: Any = None) -> None:
    """Refuse the setups where DropGrad cannot be exact, before training starts.

    FSDP2 and DeepSpeed ZeRO-1/2/3 are exact; FSDP1 and DeepSpeed's fp16/bf16 optimizer
    without ZeRO are refused. See [`hf_dropgrad.integrations.accelerate.check_supported_setup`].
    """
    accelerate_integration.check_supported_setup(args, accelerator)


def install_dropgrad(
    holder: Any,
    model: torch.nn.Module | None,
    settings: DropGradSettings,
    num_training_steps: int | None,
) -> DropGrad:
    """Wrap the optimizer inside ``holder`` (an optimizer or a chain of ``.optimizer``
    wrappers such as Accelerate's ``AcceleratedOptimizer``) in a ``DropGrad``.

    Returns the ``DropGrad`` already in the chain when there is one, so installing twice,
    or a ``DropGrad`` passed through ``Trainer(optimizers=...)``, is fine.
    """
    found = get_dropgrad(holder)
    zero = deepspeed_integration.zero_optimizer(holder)
    if found is not None:
        return found
    kwargs = settings.dropgrad_kwargs(num_training_steps)

    def build(optimizer: torch.optim.Optimizer) -> DropGrad:
        return DropGrad(optimizer, model=model, **kwargs)

    if zero is not None:
        # DeepSpeed ZeRO built its optimizer itself (an `optimizer` block, or a Trainer that
        # is not a DropGradTrainer): wrap the optimizer ZeRO steps.
        return deepspeed_integration.install_under_deepspeed(zero, None, build)
    if not hasattr(holder, "optimizer"):
        return build(holder)
    parent = holder
    while hasattr(parent.optimizer, "optimizer"):
        parent = parent.optimizer
    # Swapping the innermost optimizer keeps every wrapper (and the LR scheduler built on
    # the outermost one) working: they reach param_groups and step() through it.
    dropgrad = build(parent.optimizer)
    parent.optimizer = dropgrad
    accelerate_integration.rebind_step(parent, dropgrad)  # fp16: GradScaler must step DropGrad
    return dropgrad


class DropGradCallback(TrainerCallback):
    """Brings DropGrad to any [`Trainer`] without changing its class.

    At the start of training the callback wraps the Trainer's optimizer (whatever `--optim`
    built, or the one passed through `optimizers=`) in a [`DropGrad`] and logs which
    parameters got which rate. Before every optimizer step it sets DropGrad's step to
    `state.global_step` (so masks and schedules resume exactly), and it adds the rates that
    step used to the training logs (`dropgrad_rate`, `dropgrad_rate/<pattern>`), as the
    Trainer logs the `learning_rate` the step used. When DropGrad is off (rate 0, no module
    rates) it adds nothing, so the logs are those of the plain Trainer.

    Settings left unset are read from the `dropgrad_*` fields of the Trainer's arguments
    when they are [`DropGradTrainingArguments`], else take their defaults; the seed
    defaults to `args.seed`. Error messages name each setting as it was given
    (`DropGradCallback(module_rates=...)`, `--dropgrad_rate`).

    A `DropGrad` the Trainer already holds (passed through `optimizers=`) is used as it is:
    then no DropGrad setting may be given (a `ValueError` names those that are), and its
    parameters are named after the model in the rate table and the logs.

    Order matters: the reporting callbacks (console, TensorBoard, W&B) only see the rates if
    this callback runs before them, and `trainer.add_callback` appends at the end. Use
    [`~DropGradCallback.attach`], which puts the callback first and checks the settings
    against the model right away; with `add_callback` DropGrad trains the same and
    `state.log_history` has the rates, but the callbacks before it do not show them (a
    warning says so).

    The rate table goes through transformers' logging: shown on the main process by default,
    and, once `--log_level` is set, at INFO level on the main process (`--log_level_replica` on
    the others).

    Args:
        drop_rate (`float`, *optional*): rate of parameters no `module_rates` pattern matches.
        module_rates (`dict[str, float]` or `str`, *optional*): `{"encoder": 0.1, ...}`.
        scheduler (`str`, *optional*): `"constant"`, `"linear"`, `"cosine"` or `"step"`.
        final_rate, scheduler_steps, step_size, gamma, full_update_drop, seed: as the
            `dropgrad_*` arguments of [`DropGradTrainingArguments`].

    Example:

    ```python
    trainer = MyTrainer(model=model, args=args, train_dataset=ds)
    DropGradCallback(module_rates={"encoder": 0.1, "decoder": 0.2}).attach(trainer)
    trainer.train()
    ```
    """

    def __init__(self, **settings: Any) -> None:
        validated = self._init(settings, keyword_names(type(self).__name__))
        warn_unused(validated.values(), self._names)

    def _init(self, settings: Mapping[str, Any], names: Mapping[str, str]) -> DropGradSettings:
        """Set up the callback's state; returns the settings, validated (they fail here, not at
        step 1)."""
        unknown = sorted(set(settings) - set(ARG_FIELDS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown setting(s) {unknown}; expected one of "
                f"{list(ARG_FIELDS)}."
            )
        self._names = dict(names)
        self._settings = dict(settings)
        validated = DropGradSettings(**self._settings, names=self._names)
        # The run's settings (these merged with the Trainer's arguments), built once per
        # arguments object, and the (model, settings) pair whose patterns were checked.
        self._run: tuple[Any, tuple[Any, ...], DropGradSettings] | None = None
        self._checked: tuple[Any, DropGradSettings] | None = None
        self.dropgrad: DropGrad | None = None
        self._engine_steps = False  # DeepSpeed steps inside backward(), keyed at on_step_begin
        self._built = False  # whether this callback built the DropGrad (else: the user's)
        self._built_steps: int | None = None
        self._attached = False
        self._log_rates = False
        self._used_rates: dict[str, float] | None = None
        return validated

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], names: Mapping[str, str], *, warn: bool = True
    ) -> DropGradCallback:
        """The callback for `settings` (by the names of `__init__`), for integrations.

        `names` maps each setting to how messages should call it, as the user wrote it (e.g.
        `{"drop_rate": "DropGradTrainer(dropgrad_rate=...)", ...}`; see
        `hf_dropgrad.settings.keyword_names`). `warn=False` when the settings were already
        checked for values their schedule ignores (each mistake is reported once).
        """
        callback = cls.__new__(cls)
        validated = callback._init(settings, names)
        if warn:
            warn_unused(validated.values(), callback._names, stacklevel=3)
        return callback

    @classmethod
    def from_args(cls, args: TrainingArguments) -> DropGradCallback:
        """The callback for the `dropgrad_*` fields of `args` (messages name their flags)."""
        settings = DropGradSettings.from_args(args)
        return cls.from_settings(settings.values(), settings.names, warn=False)

    def settings(self, args: TrainingArguments) -> DropGradSettings:
        """The settings for a run with `args`: this callback's, then `args`' `dropgrad_*`.

        Built and validated once per `args` (again only if its `dropgrad_*` fields or seed
        change)."""
        read = tuple(getattr(args, arg, None) for arg in ARG_FIELDS.values())
        read += (getattr(args, "seed", None),)
        if self._run is None or self._run[0] is not args or self._run[1] != read:
            settings = DropGradSettings.from_args(args, self._settings, names=self._names)
            self._run = (args, read, settings)
        return self._run[2]

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
        dropgrad = get_dropgrad(getattr(trainer, "optimizer", None))
        if dropgrad is not None:
            self._check_no_settings(self.settings(trainer.args))
        else:
            self.validate(trainer.model, trainer.args)
        handler = trainer.callback_handler
        handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]
        self._attached = True
        return self

    def validate(self, model: torch.nn.Module, args: TrainingArguments) -> None:
        """Check the settings against `model` now (patterns that match nothing, ...)."""
        self._check_model(model, self.settings(args), args)

    def _check_model(
        self, model: torch.nn.Module | None, settings: DropGradSettings, args: TrainingArguments
    ) -> None:
        check_supported_setup(args)
        checked = self._checked
        if checked is not None and checked[0] is model and checked[1] is settings:
            return  # attach() checked this model with these settings already
        if settings.module_rates and model is not None:
            trained = {p for p in model.parameters() if p.requires_grad}
            resolve_pattern_rates(
                model.named_parameters(remove_duplicate=False),
                settings.module_rates,
                argument=settings.names["module_rates"],
                trained=trained,
            )
        self._checked = (model, settings)

    def install(
        self,
        optimizer: Any,
        model: torch.nn.Module | None,
        args: TrainingArguments,
        num_training_steps: int | None,
    ) -> DropGrad:
        """Wrap `optimizer` (or the optimizer inside its wrappers) in a `DropGrad`, once.

        A `DropGrad` already in the chain is kept: this callback's own, or the user's, which
        must then come without DropGrad settings. `num_training_steps` is the default length
        of a `linear`/`cosine` schedule.
        """
        found = get_dropgrad(optimizer)
        if found is not None and found is self.dropgrad:
            return found
        settings = self.settings(args)
        if found is None:
            self._check_model(model, settings, args)  # errors name the settings as given
            found = install_dropgrad(optimizer, model, settings, num_training_steps)
            self._log_rates = settings.enabled
            # This callback built it, for this many steps: on resume it re-applies the settings.
            self._built, self._built_steps = True, num_training_steps
        else:
            self._check_no_settings(settings)
            if model is not None:
                found.name_parameters(model)
            self._log_rates = True
        self.dropgrad = found
        return found

    def _check_no_settings(self, settings: DropGradSettings) -> None:
        given = settings.given_names()
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
        model = kwargs.get("model")
        self.install(optimizer, model, args, state.max_steps or None)
        assert self.dropgrad is not None
        zero = deepspeed_integration.zero_optimizer(optimizer)
        if zero is not None:  # ZeRO steps flat partitions: map them back to the parameters
            deepspeed_integration.install_under_deepspeed(zero, self.dropgrad, build=lambda _: None)
        self._engine_steps = zero is not None
        check_parameters(self.dropgrad)  # e.g. tensor-parallel placements
        if zero is None:
            # A forced HF_DROPGRAD_BACKEND that cannot take a parameter (its device or dtype)
            # fails here, before the first forward pass, now that the parameters sit on their
            # device. (Under ZeRO the partitions DropGrad masks appear at the step, which
            # checks them before touching anything.)
            self.dropgrad.check_backend()
        self._apply_run_settings(args, state)
        self.dropgrad.set_step(state.global_step)
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
        logger.log(
            level, "DropGrad rates (step %d):\n%s", state.global_step, self.dropgrad.describe()
        )

    def _apply_run_settings(self, args: TrainingArguments, state: TrainerState) -> None:
        """On resume, the settings of this run apply from the resumed step on; say which
        differ from the checkpoint's.

        The Trainer restores `optimizer.pt` before training starts, and `DropGrad.load_state_dict`
        restores the checkpoint's seed and schedule into a `DropGrad` built before that
        (`DropGradTrainer`). The run's own seed and schedule are put back here; the masks of
        the steps already taken are not affected. The checkpoint's settings are read from its
        trainer_state.json (`RECORD_KEY`), and this run's are written there for its own
        checkpoints. A `DropGrad` passed through `optimizers=` is left as loaded (it comes with
        no settings).
        """
        dropgrad = self.dropgrad
        if dropgrad is None or not self._built:
            return
        steps = self._built_steps or state.max_steps or None
        settings = self.settings(args)
        current = settings_record(settings, steps)
        entry = state.stateful_callbacks.get(RECORD_KEY)
        previous = entry.get("attributes", {}).get("settings") if isinstance(entry, dict) else None
        if previous is None and state.global_step > 0:
            # A checkpoint without the record (hf_dropgrad 0.1.0): what DropGrad loaded.
            previous = {"seed": dropgrad.seed}
        changes = changed_settings(previous or {}, current, settings.names)
        if settings.seed is not None:
            dropgrad.seed = settings.seed
        dropgrad.drop_rate_scheduler = settings.build_scheduler(steps)  # set_step positions it
        state.stateful_callbacks[RECORD_KEY] = {"args": {}, "attributes": {"settings": current}}
        if changes and getattr(args, "should_log", state.is_world_process_zero):
            logger.warning(
                "Resuming at step %d with DropGrad settings that differ from the checkpoint's; "
                "this run's apply from step %d on (the steps already taken keep their masks): %s",
                state.global_step, state.global_step, "; ".join(changes),
            )

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

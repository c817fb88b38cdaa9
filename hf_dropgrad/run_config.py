"""A run's DropGrad settings where its experiment trackers look: the run configuration.

The reporting callbacks of Transformers (TensorBoard, W&B, MLflow, Comet, Neptune, ...) log
the run configuration when training starts, from ``args.to_dict()`` (``to_json_string()`` and
``to_sanitized_dict()`` call it). :func:`add_to_run_config` makes ``to_dict()`` of one
arguments object hold the ``dropgrad_*`` entries of the run's settings as used
(:func:`config_entries` of :meth:`DropGradSettings.to_record
<hf_dropgrad.settings.DropGradSettings.to_record>`: the seed and a schedule's length
resolved), also when the arguments are a plain ``TrainingArguments`` and the settings come
from a ``DropGradCallback``. With DropGrad off nothing is added.

This module imports nothing from Transformers: it works on any object with ``to_dict()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from hf_dropgrad.optimizer import DropGrad
from hf_dropgrad.settings import ARG_FIELDS, DropGradSettings

__all__ = [
    "RunConfig",
    "add_to_run_config",
    "config_entries",
    "record_before_training",
    "record_of_dropgrad",
]

#: A function that returns the run's record (``None`` with DropGrad off), read each time.
RecordSource = Callable[[], "Mapping[str, Any] | None"]


def record_of_dropgrad(dropgrad: DropGrad) -> dict[str, Any]:
    """What a ``DropGrad`` built by the user (``Trainer(optimizers=...)``) says of its
    settings, which no ``dropgrad_*`` argument gave: the rate of each source at the current
    step (``{"default": r, pattern: r, "params": r}``, :meth:`DropGrad.rate_groups`), its
    schedule, full update drop and seed."""
    scheduler = dropgrad.drop_rate_scheduler
    if scheduler is None:
        schedule = "constant"
    else:
        shown = [f"{k}={v!r}" for k, v in scheduler.state_dict().items() if k != "last_step"]
        schedule = f"{type(scheduler).__name__}({', '.join(shown)})"
    return {
        "rates": dropgrad.rate_groups(),
        "scheduler": schedule,
        "full_update_drop": dropgrad.full_update_drop,
        "seed": dropgrad.seed,
    }


def record_before_training(
    settings: DropGradSettings, names: Mapping[str, str], steps: int | None
) -> dict[str, Any]:
    """The record of ``settings`` (:meth:`DropGradSettings.to_record
    <hf_dropgrad.settings.DropGradSettings.to_record>`) before training fixed a ``linear`` or
    ``cosine`` schedule's length: ``steps`` when known (``--max_steps``), else the record says
    the schedule lasts the run's optimizer steps."""
    try:
        return settings.to_record(steps, names)
    except ValueError:  # a schedule whose length is the run's, not known yet
        return {**settings.to_record(1, names), "scheduler_steps": "the run's optimizer steps"}


def config_entries(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's settings under their ``dropgrad_*`` argument names (``drop_rate`` is
    ``dropgrad_rate``), in declaration order; values as recorded (JSON data). Keys that are no
    setting (:func:`record_of_dropgrad`'s ``rates``) come first, with the same prefix."""
    out = {f"dropgrad_{key}": value for key, value in record.items() if key not in ARG_FIELDS}
    out.update({ARG_FIELDS[key]: record[key] for key in ARG_FIELDS if key in record})
    return out


class RunConfig:
    """``args.to_dict`` of one arguments object, plus the ``dropgrad_*`` entries of the run.

    Set as the instance attribute ``args.to_dict`` by :func:`add_to_run_config`. The record is
    read at each call, so the configuration logged when training starts is that run's (a
    hyperparameter-search trial's, a resumed run's). Pickled (``training_args.bin``,
    ``copy.deepcopy``), it becomes the class's own ``to_dict`` again, so the saved arguments
    load without hf_dropgrad.
    """

    def __init__(self, args: Any, record: RecordSource) -> None:
        self.args = args
        self.record = record

    def __call__(self) -> dict[str, Any]:
        out = type(self.args).to_dict(self.args)
        record = self.record()
        if record is not None:
            out.update(config_entries(record))
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial, (type(self.args).to_dict, self.args)


def add_to_run_config(args: Any, record: RecordSource) -> None:
    """Make ``args.to_dict()`` (and ``to_json_string()``, ``to_sanitized_dict()``, which call
    it) add the ``dropgrad_*`` entries of ``record()``: over the arguments' own ``dropgrad_*``
    fields where it has them (the record holds the values as used). Once per ``args``: a
    second call replaces the source. Arguments without ``to_dict`` are left alone."""
    if not callable(getattr(type(args), "to_dict", None)):
        return
    current = args.__dict__.get("to_dict")
    if isinstance(current, RunConfig):
        current.record = record
    else:
        args.to_dict = RunConfig(args, record)

"""The settings a Trainer run trains with, kept in every checkpoint, and a resume that changes them.

Each checkpoint's ``trainer_state.json`` holds, under ``stateful_callbacks[RECORD_KEY]``, the
DropGrad settings the run trained with (:meth:`DropGradSettings.to_record
<hf_dropgrad.settings.DropGradSettings.to_record>`). A resumed run applies its own settings from
the resumed step on and says which differ (:func:`apply_run_settings`). Transformers-free: it
reads and writes the ``TrainerState`` it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hf_dropgrad.optimizer import DropGrad
from hf_dropgrad.settings import DropGradSettings

__all__ = ["RECORD_KEY", "apply_run_settings", "recorded_settings"]

#: Key of DropGrad's entry in `TrainerState.stateful_callbacks`, which every checkpoint saves in
#: its trainer_state.json. (Not a callback's class name, so
#: `restore_callback_states_from_checkpoint` leaves it alone.)
RECORD_KEY = "hf_dropgrad"


def recorded_settings(state: Any, dropgrad: DropGrad) -> dict[str, Any] | None:
    """The settings recorded in ``state`` (a ``TrainerState``), or ``None`` for a fresh run.

    A checkpoint without the record (hf_dropgrad 0.1.0) gives what ``dropgrad`` loaded from
    its ``optimizer.pt``: the seed.
    """
    entry = state.stateful_callbacks.get(RECORD_KEY)
    previous = entry.get("attributes", {}).get("settings") if isinstance(entry, dict) else None
    if previous is None and state.global_step > 0:
        previous = {"seed": dropgrad.seed}
    return previous


def apply_run_settings(
    dropgrad: DropGrad,
    settings: DropGradSettings,
    names: Mapping[str, str],
    state: Any,
    steps: int | None,
) -> tuple[dict[str, Any], list[str]]:
    """Make ``dropgrad`` train with ``settings`` from ``state.global_step`` on, and record them.

    On resume, ``optimizer.pt`` (loaded before training starts) restored the checkpoint's seed
    and schedule into a ``DropGrad`` built earlier: this run's own are put back; the masks of
    the steps already taken are not affected. ``steps`` is a ``linear``/``cosine`` schedule's
    default length.

    Returns:
        The record written to ``state`` (what trainer_state.json will hold), and the settings
        that differ from the checkpoint's, named as ``names`` says (empty for a fresh run).
    """
    changes = settings.diff(recorded_settings(state, dropgrad) or {}, steps, names)
    if settings.seed is not None:
        dropgrad.seed = settings.seed
    dropgrad.drop_rate_scheduler = settings.build_scheduler(steps, names)  # set_step places it
    record = settings.to_record(steps, names)
    state.stateful_callbacks[RECORD_KEY] = {"args": {}, "attributes": {"settings": record}}
    return record, changes

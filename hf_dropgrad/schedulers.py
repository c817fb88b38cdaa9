"""Drop-rate schedulers, shaped like torch's LR schedulers.

A scheduler is a closed-form function of the optimizer step: ``last_step`` starts at 0,
:meth:`DropRateScheduler.get_last_rate` is the rate of the next optimizer step, and
:meth:`DropRateScheduler.step` advances by one. :class:`~hf_dropgrad.DropGrad` steps
its scheduler itself after every optimizer step, so the first step uses the initial
rate; users never call :meth:`step`.

Example::

    >>> sched = LinearDropRateScheduler(0.2, 0.0, num_steps=4)
    >>> [round(sched.rate_at(k), 3) for k in range(6)]
    [0.2, 0.15, 0.1, 0.05, 0.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ConstantDropRateScheduler",
    "CosineAnnealingDropRateScheduler",
    "DropRateScheduler",
    "LinearDropRateScheduler",
    "StepDropRateScheduler",
    "check_rate_number",
]


def check_rate_number(value: Any, name: str) -> float:
    """Return ``value``, an ``int`` or ``float`` (not a bool, not a string), as a float in
    ``[0, 1]``; ``TypeError``/``ValueError`` naming the argument ``name`` otherwise.

    The rule for rates given in Python. Text is read only where it is the medium (the command
    line, JSON/YAML configs: :func:`hf_dropgrad.patterns.parse_rate`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = "; pass a number, e.g. 0.1, not a string" if isinstance(value, str) else ""
        raise TypeError(
            f"{name} must be a number in [0, 1] (the probability that a gradient element is "
            f"dropped), got {value!r} of type {type(value).__name__}{hint}"
        )
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"{name} must be in [0, 1] (the probability that a gradient element is dropped), "
            f"got {value!r}"
        )
    return value


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class DropRateScheduler:
    """Base class: subclasses implement :meth:`rate_at`, a pure function of the step.

    Args:
        initial_drop_rate: the rate of the first optimizer step.
    """

    def __init__(self, initial_drop_rate: float) -> None:
        self.initial_drop_rate = check_rate_number(initial_drop_rate, "initial_drop_rate")
        self.last_step = 0

    def rate_at(self, step: int) -> float:
        """The drop rate of optimizer step ``step`` (0-based)."""
        raise NotImplementedError

    def get_last_rate(self) -> float:
        """The rate the next optimizer step uses."""
        return min(1.0, max(0.0, self.rate_at(self.last_step)))

    def get_drop_rate(self) -> float:
        """Alias of :meth:`get_last_rate` (the ``dropgrad`` package's name)."""
        return self.get_last_rate()

    def step(self) -> None:
        """Advance by one optimizer step."""
        self.last_step += 1

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: its ``__dict__`` (plain numbers and dicts)."""
        return dict(self.__dict__)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self.__dict__.update(state_dict)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({args})"


class ConstantDropRateScheduler(DropRateScheduler):
    """The same rate at every step.

    Args:
        drop_rate: the rate.
    """

    def __init__(self, drop_rate: float) -> None:
        super().__init__(check_rate_number(drop_rate, "drop_rate"))

    def rate_at(self, step: int) -> float:
        return self.initial_drop_rate


class _RampDropRateScheduler(DropRateScheduler):
    """Shared arguments of the schedules that go from one rate to another in ``num_steps``."""

    def __init__(self, initial_drop_rate: float, final_drop_rate: float, num_steps: int) -> None:
        super().__init__(initial_drop_rate)
        self.final_drop_rate = check_rate_number(final_drop_rate, "final_drop_rate")
        self.num_steps = _check_positive_int(num_steps, "num_steps")


class LinearDropRateScheduler(_RampDropRateScheduler):
    """Linear interpolation from ``initial_drop_rate`` (step 0) to ``final_drop_rate``.

    The rate reaches ``final_drop_rate`` exactly at step ``num_steps`` and stays there
    (torch's ``LinearLR`` convention).

    Args:
        initial_drop_rate: rate of the first step.
        final_drop_rate: rate from step ``num_steps`` on.
        num_steps: length of the ramp in optimizer steps.
    """

    def rate_at(self, step: int) -> float:
        if step >= self.num_steps:
            return self.final_drop_rate
        frac = step / self.num_steps
        return self.initial_drop_rate + (self.final_drop_rate - self.initial_drop_rate) * frac


class CosineAnnealingDropRateScheduler(_RampDropRateScheduler):
    """Half-cosine from ``initial_drop_rate`` (step 0) to ``final_drop_rate`` (step ``num_steps``).

    Args:
        initial_drop_rate: rate of the first step.
        final_drop_rate: rate from step ``num_steps`` on.
        num_steps: length of the annealing in optimizer steps.
    """

    def rate_at(self, step: int) -> float:
        if step >= self.num_steps:
            return self.final_drop_rate
        cos = (1.0 + math.cos(math.pi * step / self.num_steps)) / 2.0
        return self.final_drop_rate + (self.initial_drop_rate - self.final_drop_rate) * cos


class StepDropRateScheduler(DropRateScheduler):
    """Piecewise-constant rate: milestones, or torch-``StepLR``-style decay (exactly one).

    Args:
        initial_drop_rate: rate until the first milestone / the first decay.
        drop_rate_schedule: ``{step: rate}``; from optimizer step ``step`` on the rate is
            ``rate`` (until the next milestone).
        step_size: decay every ``step_size`` steps: ``rate = initial * gamma ** (k // step_size)``
            (capped at 1).
        gamma: decay factor, ``> 0``.

    Example::

        >>> StepDropRateScheduler(0.3, {100: 0.2, 200: 0.1}).rate_at(150)
        0.2
        >>> StepDropRateScheduler(0.4, step_size=10, gamma=0.5).rate_at(25)
        0.1
    """

    def __init__(
        self,
        initial_drop_rate: float,
        drop_rate_schedule: Mapping[int, float] | None = None,
        *,
        step_size: int | None = None,
        gamma: float = 0.5,
    ) -> None:
        super().__init__(initial_drop_rate)
        if (drop_rate_schedule is None) == (step_size is None):
            raise ValueError(
                "StepDropRateScheduler needs exactly one of drop_rate_schedule (a mapping "
                "{step: rate}) or step_size (decay by gamma every step_size steps)"
            )
        schedule: dict[int, float] | None = None
        if drop_rate_schedule is not None:
            if not isinstance(drop_rate_schedule, Mapping):
                raise TypeError(
                    "drop_rate_schedule must be a mapping {step: rate}, "
                    f"got {type(drop_rate_schedule).__name__}"
                )
            schedule = {}
            for k, v in sorted(drop_rate_schedule.items()):
                if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                    raise ValueError(
                        f"drop_rate_schedule keys must be non-negative int steps, got {k!r}"
                    )
                schedule[k] = check_rate_number(v, f"drop_rate_schedule[{k}]")
        self.drop_rate_schedule = schedule
        self.step_size = None if step_size is None else _check_positive_int(step_size, "step_size")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ValueError(f"gamma must be a number > 0, got {gamma!r}")
        self.gamma = float(gamma)

    def rate_at(self, step: int) -> float:
        if self.drop_rate_schedule is not None:
            rate = self.initial_drop_rate
            for milestone, value in self.drop_rate_schedule.items():
                if milestone > step:
                    break
                rate = value
            return rate
        assert self.step_size is not None
        return min(1.0, self.initial_drop_rate * self.gamma ** (step // self.step_size))


def __getattr__(name: str) -> Any:
    # check_rate, listed in __all__ before it was renamed (hf_dropgrad/deprecated.py)
    from hf_dropgrad.deprecated import module_attribute

    return module_attribute(__name__, name)

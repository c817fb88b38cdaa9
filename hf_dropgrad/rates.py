"""Which parameter gets which drop rate, and what it is called: :class:`RateTable`.

``DropGrad`` keys every rate, name and pattern by parameter *position* in the inner
optimizer's ``param_groups`` (never by tensor object: Accelerate's FSDP2 preparation and
DeepSpeed replace the tensors). A :class:`RateTable` is built once from ``DropGrad``'s
``drop_rate``/``params``/``model`` arguments (:meth:`RateTable.resolve`) and answers, at any
step, the rate of each position under the schedule.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_dropgrad.patterns import resolve_pattern_rates
from hf_dropgrad.schedulers import DropRateScheduler, check_rate_number

__all__ = ["ParameterRate", "RateTable"]


@dataclass(frozen=True)
class ParameterRate:
    """The rate of one parameter at one step, and where it came from.

    ``rate`` is ``None`` for a parameter left alone; ``pattern`` is the name pattern that gave
    the rate, if one did; ``own`` says whether ``params`` gave it (a pattern or a parameter
    key) rather than ``drop_rate``.
    """

    position: int
    name: str | int
    rate: float | None
    pattern: str | None
    own: bool

    @property
    def source(self) -> str:
        """The pattern, ``"params"`` (a ``{parameter: rate}`` entry) or ``"default"``."""
        return self.pattern or ("params" if self.own else "default")


def _all_params(param_groups: Sequence[dict[str, Any]]) -> Iterator[torch.Tensor]:
    for group in param_groups:
        yield from group["params"]


def _parameter_names(
    param_groups: Sequence[dict[str, Any]], model: torch.nn.Module | None
) -> dict[torch.Tensor, str]:
    names: dict[torch.Tensor, str] = {}
    if model is not None:
        for name, p in model.named_parameters():
            names.setdefault(p, name)
        return names
    for group in param_groups:
        for name, p in zip(group.get("param_names", ()), group["params"]):
            names.setdefault(p, name)
    return names


def _named_for_patterns(
    param_groups: Sequence[dict[str, Any]], model: torch.nn.Module | None
) -> list[tuple[str, torch.Tensor]]:
    if model is not None:
        # remove_duplicate=False lists tied parameters under every alias. Parameters the
        # optimizer does not own are kept so a pattern naming only them says so.
        return list(model.named_parameters(remove_duplicate=False))
    named = []
    for group in param_groups:
        if "param_names" not in group:
            raise ValueError(
                "params has name patterns but DropGrad cannot see parameter names: pass "
                "model=<your model>, or build the optimizer from model.named_parameters() "
                "(torch >= 2.6 then keeps param_groups[i]['param_names'])"
            )
        named.extend(zip(group["param_names"], group["params"]))
    return named


def _resolve_params(
    param_groups: Sequence[dict[str, Any]],
    params: Mapping[Any, float] | None,
    model: torch.nn.Module | None,
    names: dict[torch.Tensor, str],
) -> tuple[dict[torch.Tensor, float], dict[torch.Tensor, str]]:
    rates: dict[torch.Tensor, float] = {}
    patterns: dict[torch.Tensor, str] = {}
    if params is None:
        return rates, patterns
    if not isinstance(params, Mapping):
        raise TypeError(
            "params must be a mapping {parameter: rate} or {name pattern: rate}, "
            f"got {type(params).__name__}"
        )
    owned = set(_all_params(param_groups))
    by_pattern: dict[str, float] = {}
    for key, value in params.items():
        if isinstance(key, str):
            by_pattern[key] = check_rate_number(value, f"params[{key!r}]")
        elif isinstance(key, torch.Tensor):
            if key not in owned:
                raise ValueError(
                    f"params has a tensor of shape {tuple(key.shape)} that is not a "
                    "parameter of the wrapped optimizer"
                )
            rates[key] = check_rate_number(value, f"params[<parameter {tuple(key.shape)}>]")
        else:
            raise TypeError(
                "params keys must be parameters (torch.nn.Parameter) or name patterns "
                f"(str), got {type(key).__name__}"
            )
    if by_pattern:
        resolved = resolve_pattern_rates(
            _named_for_patterns(param_groups, model), by_pattern, trained=owned
        )
        for p, (rate, name, pattern) in resolved.items():
            names.setdefault(p, name)
            if p not in rates:  # an explicit Parameter key beats any pattern
                rates[p] = rate
                patterns[p] = pattern
    return rates, patterns


class RateTable:
    """Base rates by parameter position, their names and patterns, and the schedule.

    Args:
        num_params: how many parameters (positions ``0 .. num_params - 1``).
        base_rate: the rate of positions without their own (``None``: no rate).
        rates: ``{position: rate}`` from ``params`` (a parameter or a pattern).
        patterns: ``{position: pattern}`` for the rates a pattern gave.
        names: ``{position: parameter name}``.
        scheduler: the drop-rate schedule, or ``None``.
    """

    def __init__(
        self,
        num_params: int,
        base_rate: float | None,
        rates: dict[int, float],
        patterns: dict[int, str],
        names: dict[int, str],
        scheduler: DropRateScheduler | None,
    ) -> None:
        self.num_params = num_params
        self.base_rate = base_rate
        self.rates = rates
        self.patterns = patterns
        self.names = names
        self.scheduler = scheduler

    @classmethod
    def resolve(
        cls,
        param_groups: Sequence[dict[str, Any]],
        drop_rate: float | None,
        params: Mapping[Any, float] | None,
        model: torch.nn.Module | None,
        scheduler: DropRateScheduler | None,
    ) -> RateTable:
        """Resolve ``DropGrad``'s rate arguments against the optimizer's ``param_groups``."""
        num_params = sum(len(group["params"]) for group in param_groups)
        names = _parameter_names(param_groups, model)
        base = None if drop_rate is None else check_rate_number(drop_rate, "drop_rate")
        rates, patterns = _resolve_params(param_groups, params, model, names)
        position = {p: i for i, p in enumerate(_all_params(param_groups))}
        return cls(
            num_params,
            base,
            {position[p]: r for p, r in rates.items()},
            {position[p]: s for p, s in patterns.items()},
            {position[p]: n for p, n in names.items() if p in position},
            scheduler,
        )

    @property
    def scheduled_uniformly(self) -> bool:
        """Whether the schedule's value is every parameter's rate (no per-parameter rates)."""
        return self.scheduler is not None and not self.rates

    def schedule_factor(self) -> float:
        """``r(k) / r(0)`` of the schedule (1 without one)."""
        sched = self.scheduler
        if sched is None:
            return 1.0
        return sched.get_last_rate() / sched.rate_at(0)

    def default_rate(self) -> float | None:
        """The rate of positions without their own, at the current step."""
        if self.scheduled_uniformly:
            return self.scheduler.get_last_rate()  # type: ignore[union-attr]
        if self.base_rate is None:
            return None
        return min(1.0, self.base_rate * self.schedule_factor())

    def rate_of(self, index: int) -> float | None:
        """The rate of position ``index`` at the current step (``None``: left alone)."""
        sched = self.scheduler
        if sched is not None and not self.rates:
            return sched.get_last_rate()
        base = self.rates.get(index, self.base_rate)
        if base is None:
            return None
        return min(1.0, base * self.schedule_factor())

    def name_of(self, index: int) -> str | int:
        """The name of position ``index``, or ``index`` when it has none."""
        return self.names.get(index, index)

    def name(self, index: int, name: str) -> None:
        """Name position ``index`` ``name`` unless it has a name already."""
        self.names.setdefault(index, name)

    def add_positions(self, count: int, names: Sequence[str] = ()) -> None:
        """Append ``count`` positions (a new parameter group), named ``names``."""
        for offset, name in enumerate(names):
            self.name(self.num_params + offset, name)
        self.num_params += count

    def rows(self) -> list[ParameterRate]:
        """One :class:`ParameterRate` per position, at the current step."""
        return [
            ParameterRate(
                index,
                self.name_of(index),
                self.rate_of(index),
                self.patterns.get(index),
                index in self.rates,
            )
            for index in range(self.num_params)
        ]

    def current_rates(self) -> dict[str | int, float]:
        """``{parameter name (or position when unnamed): rate}``; no-rate positions left out."""
        return {row.name: row.rate for row in self.rows() if row.rate is not None}

"""hf_dropgrad/rates.py: rates resolved by parameter position, named, under a schedule."""

from __future__ import annotations

import pytest
import torch

from hf_dropgrad.rates import ParameterRate, RateTable
from hf_dropgrad.schedulers import LinearDropRateScheduler


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))


def groups(m: torch.nn.Module) -> list[dict]:
    return torch.optim.SGD(m.parameters(), lr=0.1).param_groups


def test_patterns_parameter_keys_and_the_default_by_position() -> None:
    m = model()
    table = RateTable.resolve(groups(m), 0.1, {"1": 0.3, m[0].bias: 0.5}, m, None)
    assert table.num_params == 4
    assert [table.rate_of(i) for i in range(4)] == [0.1, 0.5, 0.3, 0.3]
    assert table.patterns == {2: "1", 3: "1"}
    assert table.names == {0: "0.weight", 1: "0.bias", 2: "1.weight", 3: "1.bias"}
    assert table.rows()[1] == ParameterRate(1, "0.bias", 0.5, None, True)
    assert [row.source for row in table.rows()] == ["default", "params", "1", "1"]


def test_the_schedule_scales_own_rates_and_is_the_rate_without_them() -> None:
    m = model()
    sched = LinearDropRateScheduler(0.2, 0.4, 2)
    table = RateTable.resolve(groups(m), 0.2, {"1": 0.3}, m, sched)
    sched.step()
    assert table.schedule_factor() == pytest.approx(1.5)
    assert table.rate_of(0) == pytest.approx(0.3) and table.rate_of(2) == pytest.approx(0.45)
    uniform = RateTable.resolve(groups(m), None, None, m, LinearDropRateScheduler(0.0, 0.4, 2))
    assert uniform.scheduled_uniformly and uniform.default_rate() == 0.0


def test_unnamed_positions_and_added_groups() -> None:
    m = model()
    table = RateTable.resolve(groups(m), None, None, None, None)
    assert table.current_rates() == {} and table.name_of(2) == 2
    table.name(2, "x")
    table.name(2, "y")  # the first name stays
    table.add_positions(2, ["extra.a", "extra.b"])
    assert table.num_params == 6 and table.name_of(2) == "x" and table.name_of(5) == "extra.b"
    table.base_rate = 0.2
    assert table.current_rates() == {0: 0.2, 1: 0.2, "x": 0.2, 3: 0.2, "extra.a": 0.2,
                                     "extra.b": 0.2}


def test_bad_rates_name_the_argument() -> None:
    m = model()
    with pytest.raises(ValueError, match=r"params\['1'\] must be in \[0, 1\]"):
        RateTable.resolve(groups(m), None, {"1": 1.5}, m, None)
    with pytest.raises(TypeError, match="params must be a mapping"):
        RateTable.resolve(groups(m), None, [0.1], m, None)  # type: ignore[arg-type]

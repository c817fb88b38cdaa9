"""hf_dropgrad/report.py: the rate table and the rates by source, read from a RateTable."""

from __future__ import annotations

import torch

from hf_dropgrad import report
from hf_dropgrad.rates import RateTable


def table() -> RateTable:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1), torch.nn.Linear(1, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    return RateTable.resolve(opt.param_groups, 0.1, {"1": 0.3, m[2].bias: 0.5}, m, None)


def test_rate_groups_keep_the_largest_rate_per_source() -> None:
    assert report.rate_groups(table()) == {"default": 0.1, "1": 0.3, "params": 0.5}


def test_rate_groups_leave_out_parameters_without_a_rate() -> None:
    t = table()
    t.base_rate = None
    assert report.rate_groups(t) == {"1": 0.3, "params": 0.5}


def test_describe_lists_every_parameter_with_its_rate_and_pattern() -> None:
    lines = report.describe(table()).splitlines()
    assert lines[0].split() == ["parameter", "rate", "pattern"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    assert rows == {
        "0.weight": ["0.1", "-"], "0.bias": ["0.1", "-"], "1.weight": ["0.3", "1"],
        "1.bias": ["0.3", "1"], "2.weight": ["0.1", "-"], "2.bias": ["0.5", "-"],
    }
    assert lines[-1].startswith("6 parameters")

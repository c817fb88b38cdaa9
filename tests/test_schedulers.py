"""Drop-rate schedulers (hf_dropgrad/schedulers.py) and how DropGrad drives them."""

from __future__ import annotations

import io
import math

import pytest
import torch

from hf_dropgrad import (
    ConstantDropRateScheduler,
    CosineAnnealingDropRateScheduler,
    DropGrad,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)
from hf_dropgrad import functional as F
from tests.helpers import backward, tiny_mlp


def _rates(sched, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(sched.get_last_rate())
        sched.step()
    return out


def test_linear() -> None:
    assert _rates(LinearDropRateScheduler(0.2, 0.0, 4), 6) == pytest.approx(
        [0.2, 0.15, 0.1, 0.05, 0.0, 0.0]
    )
    up = LinearDropRateScheduler(0.0, 0.3, 3)
    assert _rates(up, 5) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3])


def test_cosine() -> None:
    sched = CosineAnnealingDropRateScheduler(0.4, 0.1, 4)
    expected = [0.1 + 0.3 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)] + [0.1]
    assert _rates(sched, 5) == pytest.approx(expected)


@pytest.mark.parametrize("cls", [LinearDropRateScheduler, CosineAnnealingDropRateScheduler])
def test_schedules_end_exactly_on_their_final_value(cls) -> None:
    sched = cls(0.3, 0.1, 7)
    assert sched.rate_at(7) == 0.1 and sched.rate_at(1000) == 0.1  # exact, no float drift


def test_step_milestones_and_decay() -> None:
    sched = StepDropRateScheduler(0.3, {2: 0.2, 4: 0.05})
    assert _rates(sched, 6) == [0.3, 0.3, 0.2, 0.2, 0.05, 0.05]
    decay = StepDropRateScheduler(0.4, step_size=2, gamma=0.5)
    assert _rates(decay, 5) == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])
    capped = StepDropRateScheduler(0.4, step_size=1, gamma=2.0)
    assert _rates(capped, 3) == [0.4, 0.8, 1.0]


def test_constant_and_alias() -> None:
    sched = ConstantDropRateScheduler(0.25)
    assert _rates(sched, 3) == [0.25] * 3
    assert sched.get_drop_rate() == sched.get_last_rate()


@pytest.mark.parametrize(
    "make",
    [
        lambda: LinearDropRateScheduler(0.2, 0.0, 5),
        lambda: CosineAnnealingDropRateScheduler(0.2, 0.0, 5),
        lambda: StepDropRateScheduler(0.2, {1: 0.1, 3: 0.0}),
        lambda: StepDropRateScheduler(0.2, step_size=2, gamma=0.5),
        lambda: ConstantDropRateScheduler(0.2),
    ],
)
def test_state_dict_round_trip(make) -> None:
    a = make()
    for _ in range(3):
        a.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make()
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.last_step == 3
    assert _rates(a, 4) == _rates(b, 4)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: LinearDropRateScheduler(1.2, 0.0, 5), ValueError, "initial_drop_rate"),
        (lambda: LinearDropRateScheduler(0.1, -1.0, 5), ValueError, "final_drop_rate"),
        (lambda: LinearDropRateScheduler(0.1, 0.0, 0), ValueError, "num_steps"),
        (lambda: CosineAnnealingDropRateScheduler(0.1, 0.0, 2.5), TypeError, "num_steps"),
        (lambda: StepDropRateScheduler(0.1), ValueError, "exactly one"),
        (lambda: StepDropRateScheduler(0.1, {1: 0.1}, step_size=2), ValueError, "exactly one"),
        (lambda: StepDropRateScheduler(0.1, {-1: 0.1}), ValueError, "non-negative"),
        (lambda: StepDropRateScheduler(0.1, {1: 2.0}), ValueError, r"drop_rate_schedule\[1\]"),
        (lambda: StepDropRateScheduler(0.1, step_size=2, gamma=0.0), ValueError, "gamma"),
        (lambda: ConstantDropRateScheduler("x"), TypeError, "drop_rate"),
    ],
)
def test_bad_arguments(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


def _masked_fraction(opt: DropGrad, model: torch.nn.Module) -> float:
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt._mask(opt._targets())
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    opt.optimizer.zero_grad()
    return (grads == 0).float().mean().item()


def test_dropgrad_steps_its_scheduler_and_uses_the_initial_rate_first() -> None:
    model = tiny_mlp()
    sched = LinearDropRateScheduler(0.5, 0.0, 2)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), drop_rate_scheduler=sched)
    seen = []
    for k in range(4):
        seen.append(opt.current_rates()[0])
        backward(model, k)
        opt.step()
        opt.zero_grad()
    assert seen == [0.5, 0.25, 0.0, 0.0]
    assert sched.last_step == 4 == opt.step_count


def test_schedule_scales_per_parameter_rates() -> None:
    model = tiny_mlp()
    w0, w1 = model[0].weight, model[2].weight
    sched = LinearDropRateScheduler(0.4, 0.1, 3)
    opt = DropGrad(
        torch.optim.SGD(model.parameters(), lr=0.0),
        drop_rate=0.2,
        params={w0: 0.4, w1: 0.8},
        drop_rate_scheduler=sched,
    )
    expected_factor = [1.0, 0.75, 0.5, 0.25, 0.25]
    for k, factor in enumerate(expected_factor):
        rates = opt.current_rates()
        assert rates[0] == pytest.approx(0.4 * factor)
        assert rates[2] == pytest.approx(0.8 * factor)
        assert rates[1] == pytest.approx(0.2 * factor)  # drop_rate is a base rate too
        backward(model, k)
        opt.step()
        opt.zero_grad()


def test_scheduled_rate_is_realised_in_the_masks() -> None:
    model = torch.nn.Linear(256, 256)
    sched = StepDropRateScheduler(0.5, {1: 0.1})
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), drop_rate_scheduler=sched)
    first = _masked_fraction(opt, model)
    opt._step_count_dropgrad += 1
    sched.step()
    second = _masked_fraction(opt, model)
    assert first == pytest.approx(F.realised_drop_rate(0.5), abs=0.01)
    assert second == pytest.approx(F.realised_drop_rate(0.1), abs=0.01)


def test_check_rate_number_takes_numbers_only_and_the_old_name_warns() -> None:
    from hf_dropgrad import schedulers

    assert schedulers.check_rate_number(1, "r") == 1.0
    # Numbers given as text are read only where text is the medium (command line, configs).
    with pytest.raises(TypeError, match=r"^r must be a number .*; pass a number, e\.g\. 0\.1"):
        schedulers.check_rate_number("0.1", "r")
    with pytest.raises(TypeError, match=r"initial_drop_rate must be a number .* not a string"):
        schedulers.LinearDropRateScheduler("0.1", 0.0, 10)
    with pytest.warns(FutureWarning, match="check_rate is deprecated.*use .*check_rate_number"):
        assert schedulers.check_rate is schedulers.check_rate_number

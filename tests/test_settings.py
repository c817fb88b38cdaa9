"""DropGrad's settings layer (hf_dropgrad/settings.py): the object, the parser, the checks."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from hf_dropgrad.settings import (
    FLAGS,
    SCHEDULERS,
    DropGradSettings,
    keyword_names,
    validate_settings,
)


def test_settings_from_plain_training_arguments_with_overrides() -> None:
    plain = SimpleNamespace(seed=9)  # what a plain TrainingArguments has: no dropgrad_* fields
    cfg = DropGradSettings.from_args(plain)
    assert cfg == DropGradSettings(seed=9)
    assert not cfg.enabled and cfg.given == frozenset()
    names = keyword_names("MyTrainer", prefixed=True)
    overrides = {"drop_rate": 0.2, "module_rates": "encoder=0.3"}
    cfg = DropGradSettings.from_args(plain, overrides, names)
    assert (cfg.drop_rate, cfg.module_rates, cfg.seed) == (0.2, {"encoder": 0.3}, 9)
    assert cfg.given_names() == [
        "MyTrainer(dropgrad_rate=...)", "MyTrainer(dropgrad_module_rates=...)"
    ]
    with pytest.raises(TypeError, match="dropgrad_rate"):
        DropGradSettings.from_args(plain, {"dropgrad_rate": 0.2})
    with pytest.raises(ValueError, match=r"^MyTrainer\(dropgrad_rate=\.\.\.\): must be"):
        DropGradSettings.from_args(plain, {"drop_rate": 2}, names)


def test_settings_from_args_name_flags_and_overrides_as_given() -> None:
    args = SimpleNamespace(seed=1, **{arg: None for arg in ("dropgrad_module_rates",)})
    args.dropgrad_rate, args.dropgrad_scheduler, args.dropgrad_final_rate = 0.0, "linear", 0.0
    args.dropgrad_scheduler_steps = args.dropgrad_step_size = args.dropgrad_seed = None
    args.dropgrad_gamma, args.dropgrad_full_update_drop = 0.5, False
    # A combination error names each side as the user wrote it.
    with pytest.raises(ValueError) as info:
        DropGradSettings.from_args(
            args, {"module_rates": "encoder=0.1"}, keyword_names("DropGradCallback")
        )
    message = str(info.value)
    assert message.startswith("--dropgrad_scheduler: 'linear' with DropGradCallback(module_rates=")
    assert "--dropgrad_rate = 0" in message
    settings = DropGradSettings.from_args(args)
    assert settings.given_names() == ["--dropgrad_scheduler"]  # the seed came from args.seed
    args.dropgrad_seed = 3
    given = DropGradSettings.from_args(args).given_names()
    assert given == ["--dropgrad_scheduler", "--dropgrad_seed"]


def test_settings_errors_name_the_keyword() -> None:
    with pytest.raises(ValueError, match=r"^DropGradSettings\(drop_rate=\.\.\.\): must be"):
        DropGradSettings(drop_rate=2.0)
    with pytest.raises(ValueError, match=r"^DropGradSettings\(module_rates=\.\.\.\): "):
        DropGradSettings(module_rates="x=3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        DropGradSettings().drop_rate = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    "key, good, bad",
    [
        ("drop_rate", [0.5, "0.5", " 1e-1 ", 1], [True, "x", [0.1], None, float("nan"), 1.01]),
        ("scheduler_steps", [3, "3", 3.0], [True, "3.5", 0, -1, 2.5]),
        ("gamma", [0.9, "0.9", 2], [False, "inf", 0, -1, "x"]),
        ("seed", [0, "7", 2**64 - 1], [True, -1, 2**64, "x", 1.5]),
        ("full_update_drop", [True, False], ["yes", 1, None]),
        ("scheduler", ["linear", " Cosine "], ["exp", None, 1]),
    ],
)
def test_one_dialect_for_strings_and_numbers(key, good, bad) -> None:
    """Numbers may be numeric strings, bools are never numbers, every bad value is a ValueError
    that starts with the setting's name."""
    defaults = DropGradSettings().values()
    for value in good:
        validate_settings({**defaults, key: value}, FLAGS)
    for value in bad:
        with pytest.raises(ValueError, match=rf"^{FLAGS[key]}: must be"):
            validate_settings({**defaults, key: value}, FLAGS)


@pytest.mark.parametrize(
    "kwargs, enabled",
    [
        ({}, False),
        ({"drop_rate": 0.1}, True),
        ({"module_rates": {"encoder": 0.0}}, False),
        ({"module_rates": {"encoder": 0.0, "decoder": 0.1}}, True),
        ({"scheduler": "linear", "final_rate": 0.1}, True),
        ({"scheduler": "cosine", "final_rate": 0.0}, False),
        ({"scheduler": "step", "step_size": 2}, False),
        ({"scheduler": "step", "step_size": 2, "drop_rate": 0.1}, True),
    ],
)
def test_settings_enabled(kwargs, enabled) -> None:
    assert DropGradSettings(**kwargs).enabled is enabled


def test_settings_schedule_length_defaults_to_training_steps() -> None:
    cfg = DropGradSettings(drop_rate=0.2, scheduler="cosine", final_rate=0.05)
    assert cfg.num_scheduler_steps(300) == 300
    assert cfg.scheduler_kwargs(300) == {
        "initial_drop_rate": 0.2,
        "final_drop_rate": 0.05,
        "num_steps": 300,
    }
    for bad in (None, 0, -1, True):
        with pytest.raises(ValueError, match=r"DropGradSettings\(scheduler_steps=\.\.\.\)"):
            cfg.num_scheduler_steps(bad)
    fixed = dataclasses.replace(cfg, scheduler_steps=40)
    assert fixed.num_scheduler_steps(300) == 40
    assert fixed.num_scheduler_steps(None) == 40


def test_settings_builds_the_public_schedulers() -> None:
    import hf_dropgrad

    assert DropGradSettings(drop_rate=0.1).build_scheduler() is None
    linear = DropGradSettings(drop_rate=0.2, scheduler="linear").build_scheduler(4)
    assert isinstance(linear, hf_dropgrad.LinearDropRateScheduler)
    assert [linear.rate_at(k) for k in (0, 2, 4)] == pytest.approx([0.2, 0.1, 0.0])
    cosine = DropGradSettings(drop_rate=0.2, scheduler="cosine", final_rate=0.1)
    assert isinstance(cosine.build_scheduler(10), hf_dropgrad.CosineAnnealingDropRateScheduler)
    step = DropGradSettings(drop_rate=0.4, scheduler="step", step_size=10, gamma=0.5)
    sched = step.build_scheduler()
    assert isinstance(sched, hf_dropgrad.StepDropRateScheduler)
    assert sched.rate_at(25) == pytest.approx(0.1)
    constant = DropGradSettings(drop_rate=0.3)
    cls = SCHEDULERS[constant.scheduler]
    assert cls is hf_dropgrad.ConstantDropRateScheduler
    assert cls(**constant.scheduler_kwargs()).get_last_rate() == 0.3


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"drop_rate": 0.1}, {"drop_rate": 0.1, "params": None, "scheduler": None}),
        ({}, {"drop_rate": 0.0, "params": None, "scheduler": None}),
        (
            {"scheduler": "linear", "final_rate": 0.1},
            {"drop_rate": None, "params": None, "scheduler": "LinearDropRateScheduler"},
        ),
        (
            {"module_rates": "encoder=0.1"},
            {"drop_rate": None, "params": {"encoder": 0.1}, "scheduler": None},
        ),
        (
            {"drop_rate": 0.2, "module_rates": "encoder=0.1", "scheduler": "cosine"},
            {
                "drop_rate": 0.2,
                "params": {"encoder": 0.1},
                "scheduler": "CosineAnnealingDropRateScheduler",
            },
        ),
    ],
)
def test_settings_dropgrad_kwargs(kwargs, expected) -> None:
    cfg = DropGradSettings(**kwargs, full_update_drop=True, seed=4)
    out = cfg.dropgrad_kwargs(num_training_steps=10)
    assert set(out) == {"drop_rate", "params", "drop_rate_scheduler", "full_update_drop", "seed"}
    assert out["drop_rate"] == expected["drop_rate"]
    assert out["params"] == expected["params"]
    sched = out["drop_rate_scheduler"]
    assert (type(sched).__name__ if sched is not None else None) == expected["scheduler"]
    assert (out["full_update_drop"], out["seed"]) == (True, 4)
    if out["params"] is not None:
        assert out["params"] is not cfg.module_rates


@pytest.mark.parametrize(
    "kwargs, rates, absent",
    [
        (
            {"drop_rate": 0.0},
            {"encoder.weight": 0.0, "encoder.bias": 0.0, "decoder.weight": 0.0},
            [],
        ),
        (
            {"drop_rate": 0.0, "module_rates": "encoder=0.3"},
            {"encoder.weight": 0.3, "encoder.bias": 0.3},
            ["decoder.weight"],  # matched by no pattern, drop_rate 0: no rate at all
        ),
        (
            {"drop_rate": 0.2, "module_rates": "encoder=0.3", "scheduler": "linear"},
            {"encoder.weight": 0.3, "encoder.bias": 0.3, "decoder.weight": 0.2},
            [],
        ),
        (
            {"scheduler": "linear", "final_rate": 0.4},  # a warm-up from 0
            {"encoder.weight": 0.0, "encoder.bias": 0.0, "decoder.weight": 0.0},
            [],
        ),
    ],
)
def test_settings_dropgrad_kwargs_build_a_dropgrad(kwargs, rates, absent) -> None:
    from hf_dropgrad import DropGrad

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.encoder = torch.nn.Linear(3, 3)
    model.decoder = torch.nn.Linear(3, 3, bias=False)
    cfg = DropGradSettings(**kwargs, seed=1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DropGrad(inner, model=model, **cfg.dropgrad_kwargs(num_training_steps=4))
    current = opt.current_rates()
    assert current == pytest.approx(rates)
    assert not set(absent) & set(current)
    model.decoder(model.encoder(torch.ones(2, 3))).sum().backward()
    opt.step()
    if kwargs.get("scheduler") == "linear" and "module_rates" not in kwargs:
        assert opt.current_rates()["decoder.weight"] == pytest.approx(0.1)  # 0 + 0.4 * 1/4

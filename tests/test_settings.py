"""DropGrad's settings layer (hf_dropgrad/settings.py): the object, the parser, the checks."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from hf_dropgrad.arguments import DropGradArguments
from hf_dropgrad.settings import (
    ARG_FIELDS,
    FLAGS,
    SCHEDULERS,
    DropGradSettings,
    GivenSettings,
    keyword_names,
    numbers_given_as_text,
    setting_names,
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
    assert cfg.given_names(names) == [
        "MyTrainer(dropgrad_rate=...)", "MyTrainer(dropgrad_module_rates=...)"
    ]
    assert cfg.given_names() == [  # the value keeps no spelling: the default names its fields
        "DropGradSettings(drop_rate=...)", "DropGradSettings(module_rates=...)"
    ]
    assert not hasattr(cfg, "names")
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
    assert settings.given_names(FLAGS) == ["--dropgrad_scheduler"]  # the seed is args.seed
    args.dropgrad_seed = 3
    given = DropGradSettings.from_args(args).given_names(setting_names(args))
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


def test_settings_pair_with_the_declared_arguments() -> None:
    """The arguments are declared once (hf_dropgrad/arguments.py); the settings value takes
    the same defaults, under the names without the prefix."""
    assert ARG_FIELDS == {
        "drop_rate": "dropgrad_rate",
        "module_rates": "dropgrad_module_rates",
        "scheduler": "dropgrad_scheduler",
        "final_rate": "dropgrad_final_rate",
        "scheduler_steps": "dropgrad_scheduler_steps",
        "step_size": "dropgrad_step_size",
        "gamma": "dropgrad_gamma",
        "full_update_drop": "dropgrad_full_update_drop",
        "seed": "dropgrad_seed",
    }
    declared = {f.name: f for f in dataclasses.fields(DropGradArguments)}
    assert list(declared) == list(ARG_FIELDS.values())
    defaults = DropGradSettings().values()
    for key, arg in ARG_FIELDS.items():
        assert defaults[key] == declared[arg].default, key
        assert set(declared[arg].metadata) == {"help"}  # what HfArgumentParser hands argparse
    # Declared literally: static tools see each field with its type.
    assert DropGradArguments.__annotations__["dropgrad_seed"] == int | None
    assert DropGradArguments(dropgrad_rate=0.3).dropgrad_rate == 0.3


def test_setting_names_say_how_each_setting_was_given() -> None:
    args = SimpleNamespace(dropgrad_rate=0.1, dropgrad_seed=None, seed=3)
    names = setting_names(args, ["seed"], keyword_names("MyCallback"))
    assert names["drop_rate"] == "--dropgrad_rate"  # read from args
    assert names["seed"] == "MyCallback(seed=...)"  # an override
    assert names["gamma"] == "MyCallback(gamma=...)"  # args lacks it: its default
    assert setting_names(args)["gamma"] == "DropGradSettings(gamma=...)"


@pytest.mark.parametrize(
    "kwargs, steps, record",
    [
        ({}, None, {"drop_rate": 0.0, "module_rates": None, "scheduler": "constant",
                    "full_update_drop": False, "seed": None}),
        ({"drop_rate": 0.4, "scheduler": "linear", "gamma": 0.9, "seed": 3}, 20,
         {"drop_rate": 0.4, "module_rates": None, "scheduler": "linear",
          "full_update_drop": False, "seed": 3, "final_rate": 0.0, "scheduler_steps": 20}),
        ({"drop_rate": 0.4, "scheduler": "step", "step_size": 5, "module_rates": "a=0.1"}, 20,
         {"drop_rate": 0.4, "module_rates": {"a": 0.1}, "scheduler": "step",
          "full_update_drop": False, "seed": None, "step_size": 5, "gamma": 0.5}),
    ],
)
def test_settings_record_resolves_defaults_and_leaves_out_what_the_schedule_ignores(
    kwargs, steps, record
) -> None:
    assert DropGradSettings(**kwargs).to_record(steps) == record


def test_settings_diff_names_each_changed_setting_as_given() -> None:
    checkpoint = DropGradSettings(drop_rate=0.8, scheduler="linear", seed=1).to_record(10)
    resumed = DropGradSettings(drop_rate=0.4, scheduler="linear", seed=999, final_rate=0.1)
    assert resumed.diff(checkpoint, 10, FLAGS) == [
        "--dropgrad_rate 0.8 -> 0.4",
        "--dropgrad_seed 1 -> 999",
        "--dropgrad_final_rate 0 -> 0.1",
    ]
    assert resumed.diff({"seed": 1}, 10) == ["DropGradSettings(seed=...) 1 -> 999"]
    assert resumed.diff(resumed.to_record(10), 10) == []
    rates = DropGradSettings(module_rates={"a": 0.1, "b": 0.2})
    assert rates.diff({"module_rates": None}) == [
        "DropGradSettings(module_rates=...) none -> a=0.1,b=0.2"
    ]
    with pytest.raises(ValueError, match=r"^--dropgrad_scheduler: the 'linear' schedule needs"):
        resumed.diff(checkpoint, None, FLAGS)


def test_given_settings_validate_at_once_and_merge_once_per_arguments() -> None:
    names = keyword_names("MyCallback")
    with pytest.raises(ValueError, match=r"^MyCallback\(drop_rate=\.\.\.\): must be"):
        GivenSettings({"drop_rate": 2}, names)
    given = GivenSettings({"module_rates": {"encoder": 0.1}}, names)
    assert given.entered() == ["module_rates"]
    args = SimpleNamespace(seed=5, dropgrad_rate=0.2)
    settings, used = given.resolve(args)
    assert (settings.drop_rate, settings.module_rates, settings.seed) == (0.2, {"encoder": 0.1}, 5)
    assert used["module_rates"] == "MyCallback(module_rates=...)"
    assert used["drop_rate"] == "--dropgrad_rate"
    assert given.resolve(args)[0] is settings  # once per arguments object
    args.dropgrad_rate = 0.3
    assert given.resolve(args)[0].drop_rate == 0.3  # again when its fields change
    assert given.resolve(SimpleNamespace(seed=5))[0].drop_rate == 0.0
    from_flags = GivenSettings(DropGradSettings(drop_rate=0.1).values(), FLAGS)
    assert from_flags.entered() == []  # read from arguments: checked and warned there


def test_numbers_given_as_text() -> None:
    assert numbers_given_as_text({"drop_rate": "0.1", "seed": 3, "scheduler": "linear"}) == [
        "drop_rate"
    ]
    assert numbers_given_as_text({"gamma": "0.5", "step_size": "2"}) == ["step_size", "gamma"]
    assert numbers_given_as_text({"module_rates": {"a": "0.1"}}) == ["module_rates"]
    assert numbers_given_as_text({"module_rates": "a=0.1"}) == []  # PATTERN=RATE is text
    assert numbers_given_as_text({"module_rates": {"a": 0.1}, "full_update_drop": True}) == []


def test_settings_check_model_names_the_setting() -> None:
    model = torch.nn.Module()
    model.encoder = torch.nn.Linear(2, 2)
    model.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    DropGradSettings(module_rates={"encoder": 0.1}).check_model(model)
    DropGradSettings(module_rates={"nope": 0.1}).check_model(None)  # no model: nothing to check
    with pytest.raises(ValueError, match=r"^--dropgrad_module_rates: 1 pattern matches no"):
        DropGradSettings(module_rates={"encodr": 0.1}).check_model(model, FLAGS)
    with pytest.raises(ValueError, match="only parameters that do not train"):
        DropGradSettings(module_rates={"frozen": 0.1}).check_model(model)

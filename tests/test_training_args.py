"""DropGrad's TrainingArguments subclasses (hf_dropgrad/training_args.py)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from hf_dropgrad.settings import DropGradSettings
from hf_dropgrad.training_args import (
    DropGradSeq2SeqTrainingArguments,
    DropGradTrainingArguments,
)

DROPGRAD_FIELDS = {
    "dropgrad_rate": 0.0,
    "dropgrad_module_rates": None,
    "dropgrad_scheduler": "constant",
    "dropgrad_final_rate": 0.0,
    "dropgrad_scheduler_steps": None,
    "dropgrad_step_size": None,
    "dropgrad_gamma": 0.5,
    "dropgrad_full_update_drop": False,
    "dropgrad_seed": None,
}


@pytest.fixture
def base(tmp_path) -> dict:
    return {"output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none"}


@pytest.fixture
def cli_base(tmp_path) -> list[str]:
    return ["--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none"]


def _parse(cls, argv: list[str]):
    (args,) = HfArgumentParser(cls).parse_args_into_dataclasses(args=argv)
    return args


def _dropgrad_values(args) -> dict:
    return {name: getattr(args, name) for name in DROPGRAD_FIELDS}


# -- fields and defaults --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DropGradTrainingArguments, DropGradSeq2SeqTrainingArguments])
def test_fields_defaults_and_order(cls, base) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    # Exactly the public dropgrad_* fields are added, after every field of the parent class.
    parent = Seq2SeqTrainingArguments if "Seq2Seq" in cls.__name__ else TrainingArguments
    assert names[: -len(DROPGRAD_FIELDS)] == [f.name for f in dataclasses.fields(parent)]
    assert names[-len(DROPGRAD_FIELDS) :] == list(DROPGRAD_FIELDS)
    args = cls(**base, eval_strategy="steps")
    assert isinstance(args, parent)
    assert _dropgrad_values(args) == DROPGRAD_FIELDS
    # The parent's __post_init__ ran too (it turns strategy strings into enums).
    assert args.eval_strategy is IntervalStrategy.STEPS


def test_public_names_from_package() -> None:
    import hf_dropgrad

    assert hf_dropgrad.DropGradTrainingArguments is DropGradTrainingArguments
    assert hf_dropgrad.DropGradSeq2SeqTrainingArguments is DropGradSeq2SeqTrainingArguments


# -- parsing ----------------------------------------------------------------------------------


def test_cli_parses_every_flag(cli_base) -> None:
    args = _parse(
        DropGradTrainingArguments,
        [
            *cli_base,
            "--dropgrad_rate", "0.1",
            "--dropgrad_module_rates", "encoder=0.1,decoder=0.2",
            "--dropgrad_scheduler", "cosine",
            "--dropgrad_final_rate", "0.01",
            "--dropgrad_scheduler_steps", "500",
            "--dropgrad_full_update_drop",
            "--dropgrad_seed", "7",
        ],
    )  # fmt: skip
    assert _dropgrad_values(args) == {
        **DROPGRAD_FIELDS,
        "dropgrad_rate": 0.1,
        "dropgrad_module_rates": {"encoder": 0.1, "decoder": 0.2},
        "dropgrad_scheduler": "cosine",
        "dropgrad_final_rate": 0.01,
        "dropgrad_scheduler_steps": 500,
        "dropgrad_full_update_drop": True,
        "dropgrad_seed": 7,
    }
    assert type(args.dropgrad_module_rates) is dict
    assert all(type(v) is float for v in args.dropgrad_module_rates.values())


def test_cli_step_schedule_and_hyphen_aliases(cli_base) -> None:
    args = _parse(
        DropGradTrainingArguments,
        [
            *cli_base,
            "--dropgrad-rate", "0.4",
            "--dropgrad-scheduler", " Step ",
            "--dropgrad-step-size", "10",
            "--dropgrad-gamma", "0.25",
        ],
    )  # fmt: skip
    assert (args.dropgrad_rate, args.dropgrad_scheduler) == (0.4, "step")
    assert (args.dropgrad_step_size, args.dropgrad_gamma) == (10, 0.25)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("encoder=0.1, decoder = 0.2", {"encoder": 0.1, "decoder": 0.2}),
        ('{"encoder": 0.1, "decoder": 0.2}', {"encoder": 0.1, "decoder": 0.2}),
        (r".*layer\.\d{1,2}\..*=0.3,encoder=0", {r".*layer\.\d{1,2}\..*": 0.3, "encoder": 0.0}),
        ('{"a{1,2}": 0.1}', {"a{1,2}": 0.1}),
    ],
)
def test_cli_module_rates_forms(cli_base, text, expected) -> None:
    args = _parse(DropGradTrainingArguments, [*cli_base, "--dropgrad_module_rates", text])
    assert args.dropgrad_module_rates == expected


def test_json_file_with_nested_mapping(tmp_path) -> None:
    config = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": "none",
        "dropgrad_rate": 0.05,
        "dropgrad_module_rates": {"encoder": 0.1, ".*attention.*": 0.2},
        "dropgrad_scheduler": "linear",
        "dropgrad_scheduler_steps": 100,
    }
    path = tmp_path / "args.json"
    path.write_text(json.dumps(config))
    (args,) = HfArgumentParser(DropGradTrainingArguments).parse_json_file(str(path))
    assert args.dropgrad_module_rates == {"encoder": 0.1, ".*attention.*": 0.2}
    assert (args.dropgrad_rate, args.dropgrad_scheduler) == (0.05, "linear")
    assert args.dropgrad_scheduler_steps == 100


def test_yaml_file_with_nested_mapping(tmp_path) -> None:
    path = tmp_path / "args.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        "use_cpu: true\n"
        "report_to: none\n"
        "dropgrad_rate: 1e-1  # PyYAML reads this as a string\n"
        "dropgrad_module_rates:\n"
        "  encoder: 0.1\n"
        "  'layer\\.\\d{1,2}\\..*': 0.3\n"
        "dropgrad_full_update_drop: true\n"
        "dropgrad_seed: 3\n"
    )
    assert yaml.safe_load(path.read_text())["dropgrad_rate"] == "1e-1"
    (args,) = HfArgumentParser(DropGradTrainingArguments).parse_yaml_file(str(path))
    assert args.dropgrad_rate == 0.1 and type(args.dropgrad_rate) is float
    assert args.dropgrad_module_rates == {"encoder": 0.1, r"layer\.\d{1,2}\..*": 0.3}
    assert args.dropgrad_full_update_drop is True
    assert args.dropgrad_seed == 3


def test_parse_dict_and_direct_construction(base) -> None:
    (args,) = HfArgumentParser(DropGradTrainingArguments).parse_dict(
        {**base, "dropgrad_module_rates": {"decoder": 0.3}, "dropgrad_scheduler": "CONSTANT"}
    )
    assert args.dropgrad_module_rates == {"decoder": 0.3}
    assert args.dropgrad_scheduler == "constant"
    direct = DropGradTrainingArguments(**base, dropgrad_module_rates="decoder=0.3")
    assert direct.dropgrad_module_rates == {"decoder": 0.3}


def test_module_rates_input_dict_is_copied(base) -> None:
    rates = {"encoder": 0.1}
    args = DropGradTrainingArguments(**base, dropgrad_module_rates=rates)
    rates["encoder"] = 0.9
    assert args.dropgrad_module_rates == {"encoder": 0.1}


# -- bad values raise at parse time, naming the flag -------------------------------------------

BAD_VALUES = [
    ("dropgrad_rate", 1.5, r"\[0, 1\]"),
    ("dropgrad_rate", -0.1, r"\[0, 1\]"),
    ("dropgrad_rate", float("nan"), r"\[0, 1\]"),
    ("dropgrad_rate", True, r"\[0, 1\]"),
    ("dropgrad_rate", "abc", r"\[0, 1\]"),
    ("dropgrad_rate", [0.1], r"\[0, 1\]"),
    ("dropgrad_final_rate", 2, r"\[0, 1\]"),
    ("dropgrad_module_rates", "encoder=1.5", "rate of 'encoder'"),
    ("dropgrad_module_rates", "encoder=yes", "rate of 'encoder'"),
    ("dropgrad_module_rates", {"encoder": True}, "rate of 'encoder'"),
    ("dropgrad_module_rates", "encoder", "PATTERN=RATE"),
    ("dropgrad_module_rates", "=0.1", "PATTERN=RATE"),
    ("dropgrad_module_rates", "encoder=0.1,encoder=0.2", "more than once"),
    ("dropgrad_module_rates", '{"encoder": 0.1, "encoder": 0.2}', "more than once"),
    ("dropgrad_module_rates", '{"encoder": 0.1', "not a valid JSON object"),
    ("dropgrad_module_rates", "*attention*=0.1", "not a valid regular expression"),
    ("dropgrad_module_rates", "encoder..block=0.1", "empty component"),
    ("dropgrad_module_rates", {1: 0.1}, "non-empty strings"),
    ("dropgrad_module_rates", ["encoder"], "PATTERN=RATE"),
    ("dropgrad_scheduler", "exponential", "'constant', 'linear', 'cosine', 'step'"),
    ("dropgrad_scheduler", None, "'constant', 'linear', 'cosine', 'step'"),
    ("dropgrad_scheduler_steps", 0, "positive integer"),
    ("dropgrad_scheduler_steps", 1.5, "positive integer"),
    ("dropgrad_scheduler_steps", True, "positive integer"),
    ("dropgrad_step_size", -3, "positive integer"),
    ("dropgrad_gamma", 0, "> 0"),
    ("dropgrad_gamma", -0.5, "> 0"),
    ("dropgrad_gamma", float("inf"), "> 0"),
    ("dropgrad_full_update_drop", "yes", "True or False"),
    ("dropgrad_seed", -1, r"\[0, 2\*\*64\)"),
    ("dropgrad_seed", "x", r"\[0, 2\*\*64\)"),
]


@pytest.mark.parametrize("name, value, message", BAD_VALUES)
def test_bad_value_raises_naming_the_flag(base, name, value, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        DropGradTrainingArguments(**base, **{name: value})
    assert f"--{name}" in str(info.value)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--dropgrad_rate", "1.5"], "--dropgrad_rate"),
        (["--dropgrad_module_rates", "encoder=0.1,decoder=2"], "--dropgrad_module_rates"),
        (["--dropgrad_scheduler", "exp"], "--dropgrad_scheduler"),
        (["--dropgrad_scheduler_steps", "0"], "--dropgrad_scheduler_steps"),
    ],
)
def test_bad_cli_value_raises_at_parse_time(cli_base, argv, flag) -> None:
    with pytest.raises(ValueError, match=flag):
        _parse(DropGradSeq2SeqTrainingArguments, [*cli_base, *argv])


def test_step_schedule_needs_step_size(base) -> None:
    with pytest.raises(ValueError, match="--dropgrad_step_size") as info:
        DropGradTrainingArguments(**base, dropgrad_rate=0.2, dropgrad_scheduler="step")
    assert "--dropgrad_scheduler" in str(info.value)


@pytest.mark.parametrize("kind", ["linear", "cosine", "step"])
def test_schedule_with_module_rates_needs_a_positive_rate(base, kind) -> None:
    kwargs = {"dropgrad_scheduler": kind, "dropgrad_module_rates": "encoder=0.1"}
    if kind == "step":
        kwargs["dropgrad_step_size"] = 5
    with pytest.raises(ValueError, match="--dropgrad_rate") as info:
        DropGradTrainingArguments(**base, **kwargs)
    assert "--dropgrad_module_rates" in str(info.value)
    args = DropGradTrainingArguments(**base, **kwargs, dropgrad_rate=0.1)
    assert args.dropgrad_module_rates == {"encoder": 0.1}


def test_warmup_from_zero_without_module_rates_is_valid(base) -> None:
    args = DropGradTrainingArguments(
        **base, dropgrad_scheduler="linear", dropgrad_rate=0.0, dropgrad_final_rate=0.1
    )
    assert DropGradSettings.from_args(args).enabled


@pytest.mark.parametrize(
    "kwargs, ignored",
    [
        ({"dropgrad_final_rate": 0.1}, "--dropgrad_final_rate"),
        ({"dropgrad_scheduler_steps": 10}, "--dropgrad_scheduler_steps"),
        ({"dropgrad_step_size": 10}, "--dropgrad_step_size"),
        ({"dropgrad_gamma": 0.9, "dropgrad_scheduler": "linear"}, "--dropgrad_gamma"),
        (
            {"dropgrad_scheduler": "step", "dropgrad_step_size": 3, "dropgrad_final_rate": 0.1},
            "--dropgrad_final_rate",
        ),
    ],
)
def test_settings_unused_by_the_schedule_warn(base, kwargs, ignored) -> None:
    with pytest.warns(UserWarning, match=f"{ignored} is ignored"):
        DropGradTrainingArguments(**base, **kwargs)


def test_consistent_settings_do_not_warn(base) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        DropGradTrainingArguments(
            **base,
            dropgrad_rate=0.2,
            dropgrad_scheduler="step",
            dropgrad_step_size=3,
            dropgrad_gamma=0.9,
        )
        DropGradTrainingArguments(**base, dropgrad_scheduler="cosine", dropgrad_final_rate=0.1)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


# -- saving and reloading ---------------------------------------------------------------------


@pytest.fixture
def configured(base) -> DropGradSeq2SeqTrainingArguments:
    return DropGradSeq2SeqTrainingArguments(
        **base,
        predict_with_generate=True,
        generation_max_length=32,
        dropgrad_rate=0.1,
        dropgrad_module_rates=r"encoder=0.1, .*layer\.\d{1,2}\..*=0.3",
        dropgrad_scheduler="linear",
        dropgrad_final_rate=0.02,
        dropgrad_scheduler_steps=50,
        dropgrad_full_update_drop=True,
        dropgrad_seed=11,
    )


EXPECTED_CONFIGURED = {
    "dropgrad_rate": 0.1,
    "dropgrad_module_rates": {"encoder": 0.1, r".*layer\.\d{1,2}\..*": 0.3},
    "dropgrad_scheduler": "linear",
    "dropgrad_final_rate": 0.02,
    "dropgrad_scheduler_steps": 50,
    "dropgrad_step_size": None,
    "dropgrad_gamma": 0.5,
    "dropgrad_full_update_drop": True,
    "dropgrad_seed": 11,
}


def test_to_dict_and_json_round_trip(configured) -> None:
    d = configured.to_dict()
    assert {k: d[k] for k in DROPGRAD_FIELDS} == EXPECTED_CONFIGURED
    loaded = json.loads(configured.to_json_string())
    assert {k: loaded[k] for k in DROPGRAD_FIELDS} == EXPECTED_CONFIGURED
    rebuilt = DropGradSeq2SeqTrainingArguments(**loaded)
    assert _dropgrad_values(rebuilt) == EXPECTED_CONFIGURED
    assert rebuilt.to_dict() == d
    # to_sanitized_dict (TensorBoard hparams) takes the dict too.
    assert "dropgrad_module_rates" in configured.to_sanitized_dict()


def test_json_config_written_from_to_dict_parses_back(configured, tmp_path) -> None:
    path = tmp_path / "saved.json"
    path.write_text(configured.to_json_string())
    (args,) = HfArgumentParser(DropGradSeq2SeqTrainingArguments).parse_json_file(str(path))
    assert _dropgrad_values(args) == EXPECTED_CONFIGURED
    assert args.predict_with_generate is True


def test_training_args_bin_round_trip(configured, tmp_path) -> None:
    path = tmp_path / "training_args.bin"
    torch.save(configured, path)  # what Trainer._save does
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is DropGradSeq2SeqTrainingArguments
    assert _dropgrad_values(loaded) == EXPECTED_CONFIGURED
    assert loaded.to_dict() == configured.to_dict()


def test_replace_revalidates_and_keeps_normalised_values(configured) -> None:
    changed = dataclasses.replace(configured, dropgrad_rate=0.3)
    assert changed.dropgrad_rate == 0.3
    assert changed.dropgrad_module_rates == EXPECTED_CONFIGURED["dropgrad_module_rates"]
    with pytest.raises(ValueError, match="--dropgrad_final_rate"):
        dataclasses.replace(configured, dropgrad_final_rate=3.0)


# -- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DropGradTrainingArguments, DropGradSeq2SeqTrainingArguments])
def test_help_explains_every_flag(cls) -> None:
    text = " ".join(HfArgumentParser(cls).format_help().split())
    for name in DROPGRAD_FIELDS:
        help_text = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["help"]
        assert len(help_text) > 40, name
        assert f"--{name}" in text
        assert " ".join(help_text.split()) in text, name
    assert "encoder=0.1,decoder=0.2" in text
    for kind in ("constant", "linear", "cosine", "step"):
        assert f"'{kind}'" in text


@pytest.mark.parametrize("cls", [DropGradTrainingArguments, DropGradSeq2SeqTrainingArguments])
def test_docstring_documents_every_field(cls) -> None:
    assert "Parameters:" in cls.__doc__
    doc = " ".join(cls.__doc__.split())
    for name in DROPGRAD_FIELDS:
        assert f"        {name} (`" in cls.__doc__, name
        # written once, in the field's help: the docstring is generated from it
        help_text = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["help"]
        assert " ".join(help_text.split()) in doc, name


# -- Seq2Seq ------------------------------------------------------------------------------------


def test_seq2seq_variant_keeps_generation_arguments(cli_base) -> None:
    args = _parse(
        DropGradSeq2SeqTrainingArguments,
        [
            *cli_base,
            "--predict_with_generate",
            "--generation_max_length", "64",
            "--generation_num_beams", "2",
            "--dropgrad_module_rates", "encoder=0.1,decoder=0.2",
        ],
    )  # fmt: skip
    assert isinstance(args, Seq2SeqTrainingArguments)
    assert args.predict_with_generate is True
    assert (args.generation_max_length, args.generation_num_beams) == (64, 2)
    assert args.dropgrad_module_rates == {"encoder": 0.1, "decoder": 0.2}
    d = args.to_dict()
    assert d["predict_with_generate"] is True
    assert d["dropgrad_module_rates"] == {"encoder": 0.1, "decoder": 0.2}


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_rule_is_the_core_rule(base, seed) -> None:
    with pytest.raises(ValueError, match=r"--dropgrad_seed.*\[0, 2\*\*64\)"):
        DropGradTrainingArguments(**base, dropgrad_seed=seed)
    assert DropGradTrainingArguments(**base, dropgrad_seed=2**64 - 1).dropgrad_seed == 2**64 - 1


def test_settings_from_args_resolve_the_seed(base) -> None:
    args = DropGradTrainingArguments(**base, seed=123, dropgrad_rate=0.1)
    assert DropGradSettings.from_args(args).seed == 123
    args = DropGradTrainingArguments(**base, seed=123, dropgrad_seed=5)
    assert DropGradSettings.from_args(args).seed == 5
    assert args.dropgrad_seed == 5

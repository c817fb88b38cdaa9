"""scripts/study.py: each arm must train with exactly the drop rates its name says.

The examples apply DropGrad by default, so a baseline that only omits the DropGrad flags
silently trains with the example's rates. These tests pin the flags of every configuration and
the check that compares them with what the callback logged.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "scripts" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # dataclasses look their module up while building the class
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("study", None)


def test_expected_rate_logs_of_every_configuration(study):
    expected = {
        (task, config.name): study.expected_rate_logs(config)
        for task, configs in (
            ("seq2seq", study.SEQ2SEQ_CONFIGS),
            ("classification", study.CLASSIFICATION_CONFIGS),
        )
        for config in configs
    }
    assert expected == {
        ("seq2seq", "baseline"): {},
        ("seq2seq", "both p=0.1"): {"dropgrad_rate/encoder": 0.1, "dropgrad_rate/decoder": 0.1},
        ("seq2seq", "both p=0.3"): {"dropgrad_rate/encoder": 0.3, "dropgrad_rate/decoder": 0.3},
        ("seq2seq", "both p=0.5"): {"dropgrad_rate/encoder": 0.5, "dropgrad_rate/decoder": 0.5},
        ("seq2seq", "encoder p=0.3"): {"dropgrad_rate/encoder": 0.3},
        ("seq2seq", "decoder p=0.3"): {"dropgrad_rate/decoder": 0.3},
        ("seq2seq", "both p=0.3 full"): {
            "dropgrad_rate/encoder": 0.3,
            "dropgrad_rate/decoder": 0.3,
        },
        ("classification", "baseline"): {},
        ("classification", "all p=0.1"): {"dropgrad_rate": 0.1},
        ("classification", "all p=0.3"): {"dropgrad_rate": 0.3},
    }


def test_baselines_switch_off_the_examples_default_rates(study):
    # Without these flags the flagship trains with encoder=0.1,decoder=0.2 and the classifier
    # with 0.1: the "baseline" would not be one.
    seq2seq = study.SEQ2SEQ_CONFIGS[0]
    classification = study.CLASSIFICATION_CONFIGS[0]
    assert seq2seq.name == classification.name == "baseline"
    assert seq2seq.flags == ("--dropgrad_rate", "0", "--dropgrad_module_rates", "")
    assert classification.flags == ("--dropgrad_rate", "0")


def test_check_rates_accepts_what_the_configuration_asks_for(study, tmp_path):
    both = study.SEQ2SEQ_CONFIGS[2]
    history = [
        {"step": 6, "loss": 3.0, "dropgrad_rate/encoder": 0.3, "dropgrad_rate/decoder": 0.3},
        {"step": 12, "loss": 2.0, "dropgrad_rate/encoder": 0.3, "dropgrad_rate/decoder": 0.3},
        {"step": 12, "eval_loss": 2.5},
    ]
    study.check_rates(both, history, tmp_path)
    # a baseline may log rate 0 (DropGrad installed as an exact no-op) or nothing at all
    study.check_rates(study.SEQ2SEQ_CONFIGS[0], [{"step": 6, "dropgrad_rate": 0.0}], tmp_path)
    study.check_rates(study.SEQ2SEQ_CONFIGS[0], [{"step": 6, "loss": 1.0}], tmp_path)


@pytest.mark.parametrize(
    ("index", "history", "match"),
    [
        # the bug this guards against: a baseline that trained with the example's default rates
        (0, [{"step": 6, "dropgrad_rate/encoder": 0.1, "dropgrad_rate/decoder": 0.2}], "absent"),
        # encoder-only that also dropped the decoder's gradients
        (4, [{"step": 6, "dropgrad_rate/encoder": 0.3, "dropgrad_rate/decoder": 0.2}], "encoder"),
        # the right patterns at the wrong rate
        (2, [{"step": 6, "dropgrad_rate/encoder": 0.1, "dropgrad_rate/decoder": 0.1}], "0.3"),
        # DropGrad never installed in an arm that asks for it
        (1, [{"step": 6, "loss": 1.0}], "0.1"),
    ],
)
def test_check_rates_rejects_a_run_with_other_rates(study, tmp_path, index, history, match):
    with pytest.raises(RuntimeError, match=match):
        study.check_rates(study.SEQ2SEQ_CONFIGS[index], history, tmp_path)

"""Supported transformers/accelerate versions and the API differences between them
(hf_dropgrad/compat.py); these tests run on the latest and on the floor stack (README,
"Supported versions")."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from hf_dropgrad import compat

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "version, release",
    [("4.56.2", (4, 56, 2)), ("5.24.0", (5, 24, 0)), ("4.57.0.dev0", (4, 57, 0)),
     ("2.13.0+cpu", (2, 13, 0)), ("1.10.0rc1", (1, 10, 0)), ("4.56", (4, 56))],
)
def test_release_reads_the_numeric_part(version: str, release: tuple[int, ...]) -> None:
    assert compat._release(version) == release


def _fake_versions(monkeypatch: pytest.MonkeyPatch, **versions: str | None) -> None:
    real = metadata.version

    def version(name: str) -> str:
        if name in versions:
            if versions[name] is None:
                raise metadata.PackageNotFoundError(name)
            return versions[name]
        return real(name)

    monkeypatch.setattr(metadata, "version", version)


@pytest.mark.parametrize(
    "package, installed", [("transformers", "4.40.0"), ("accelerate", "1.0.1")]
)
def test_an_old_release_is_refused_naming_both_versions(monkeypatch, package, installed) -> None:
    _fake_versions(monkeypatch, **{package: installed})
    floor = compat.MIN_VERSIONS[package]
    with pytest.raises(compat.UnsupportedVersionError) as info:
        compat.check_versions()
    message = str(info.value)
    assert f"{package} {installed} is installed" in message
    assert f"{package}>={floor}" in message
    assert isinstance(info.value, ImportError)


def test_a_missing_package_is_refused_saying_what_to_install(monkeypatch) -> None:
    _fake_versions(monkeypatch, accelerate=None)
    with pytest.raises(compat.UnsupportedVersionError, match=r"accelerate>=1\.10, which is not"):
        compat.check_versions()


def test_the_floors_and_the_installed_releases_pass(monkeypatch) -> None:
    compat.check_versions()  # what this test run has installed
    _fake_versions(monkeypatch, transformers="4.56.0", accelerate="1.10.0")
    compat.check_versions()


_IMPORT_WITH_OLD_TRANSFORMERS = """
import sys
from importlib import metadata
real = metadata.version
metadata.version = lambda name: "4.40.0" if name == "transformers" else real(name)
from hf_dropgrad import DropGrad  # the torch core still imports, without transformers
assert "transformers" not in sys.modules
try:
    from hf_dropgrad import {name}
except ImportError as error:
    print(type(error).__name__, error)
else:
    print("imported")
"""


@pytest.mark.parametrize(
    "name", ["DropGradTrainer", "DropGradCallback", "DropGradSeq2SeqTrainingArguments"]
)
def test_importing_the_transformers_layer_on_an_old_release_fails_once(name: str) -> None:
    code = _IMPORT_WITH_OLD_TRANSFORMERS.format(name=name)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.startswith("UnsupportedVersionError"), result.stdout + result.stderr
    assert "transformers 4.40.0 is installed" in result.stdout
    assert "transformers>=4.56" in result.stdout


def test_the_floors_are_those_of_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["optional-dependencies"]["transformers"]
    floors = dict(re.fullmatch(r"([a-z]+)>=([\d.]+)", r).groups() for r in requirements)
    assert floors == compat.MIN_VERSIONS


def test_the_floor_stack_of_ci_is_at_the_floors() -> None:
    script = (ROOT / "scripts" / "test_floor.sh").read_text()
    pins = dict(re.findall(r"^\s+([a-z]+)==([\d.]+)$", script, flags=re.MULTILINE))
    for package, floor in compat.MIN_VERSIONS.items():
        assert pins[package].startswith(floor + "."), (package, pins[package])


def test_create_optimizer_is_called_in_the_form_it_accepts() -> None:
    model = object()
    assert compat.call_create_optimizer(lambda: "no model", model) == "no model"  # 4.56 - 5.3
    assert compat.call_create_optimizer(lambda model=None: model, model) is model  # 5.4 -
    assert compat.call_create_optimizer(lambda *args: args, model) == (model,)
    assert compat.call_create_optimizer(lambda model=None: model) is None


def test_create_optimizer_of_the_installed_trainer() -> None:
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    model = torch.nn.Linear(2, 2)
    args = TrainingArguments("unused", use_cpu=True, report_to="none")
    trainer = Trainer(model=model, args=args)
    optimizer = compat.call_create_optimizer(trainer.create_optimizer, model)
    assert isinstance(optimizer, torch.optim.Optimizer) and trainer.optimizer is optimizer
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()
    }


@pytest.mark.slow
def test_callback_attached_to_a_plain_seq2seq_trainer_masks(tmp_path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from hf_dropgrad import DropGradCallback, DropGradSeq2SeqTrainer, get_dropgrad
    from tests.trainer_helpers import common, seq2seq_data, tiny_t5

    kw = common(tmp_path, max_steps=3, logging_steps=1)
    rates = {"encoder": 0.3, "decoder": 0.5}
    ref = DropGradSeq2SeqTrainer(
        model=tiny_t5(), args=Seq2SeqTrainingArguments(**kw), train_dataset=seq2seq_data(),
        dropgrad_module_rates=rates,
    )
    ref.train()
    trainer = Seq2SeqTrainer(
        model=tiny_t5(), args=Seq2SeqTrainingArguments(**kw), train_dataset=seq2seq_data()
    )
    callback = DropGradCallback(module_rates=rates).attach(trainer)
    trainer.train()
    assert trainer.callback_handler.callbacks[0] is callback
    assert callback.dropgrad is get_dropgrad(trainer) and callback.dropgrad.step_count == 3
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [(e["dropgrad_rate/encoder"], e["dropgrad_rate/decoder"]) for e in logged] == [
        (0.3, 0.5)
    ] * 3
    for a, b in zip(ref.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)  # the same masks as DropGradSeq2SeqTrainer
    plain = Seq2SeqTrainer(
        model=tiny_t5(), args=Seq2SeqTrainingArguments(**kw), train_dataset=seq2seq_data()
    )
    plain.train()
    assert not all(
        torch.equal(a, b) for a, b in zip(plain.model.parameters(), trainer.model.parameters())
    )

"""The deprecated names (hf_dropgrad/deprecated.py): every row of the table warns with a
FutureWarning naming its replacement and the release that removes it, at the user's line, and
resolves to the right object; CHANGELOG.md and the README name the same release.

A new row is tested by the parametrised tests below without further work when it is a module
attribute; a deprecated method or property needs one entry in ``CALLS``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hf_dropgrad
from hf_dropgrad.deprecated import DEPRECATIONS, REMOVED_IN, Deprecation

pytest.importorskip("transformers")

from hf_dropgrad import DropGradCallback, DropGradTrainingArguments
from hf_dropgrad.settings import SCHEDULERS, DropGradSettings

ROOT = Path(__file__).resolve().parent.parent
ATTRIBUTES = [entry for entry in DEPRECATIONS if entry.target is not None]
METHODS = [entry for entry in DEPRECATIONS if entry.target is None]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def _object(dotted: str) -> Any:
    """The object a replacement names (its leading dotted path), or None when it names none."""
    path = re.match(r"[\w.]+", dotted).group()
    module, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        return None


def _check_warning(record: pytest.WarningsRecorder, entry: Deprecation,
                   as_written: str | None = None) -> None:
    assert len(record) == 1, [str(w.message) for w in record]
    warning = record[0]
    assert warning.category is FutureWarning
    assert str(warning.message) == (
        f"{as_written or entry.old} is deprecated and will be removed in hf_dropgrad "
        f"{REMOVED_IN}; use {entry.new} instead.")
    assert warning.filename == __file__  # it points at the line that used the old name


def test_the_table_has_one_removal_release_after_this_one() -> None:
    assert len({entry.old for entry in DEPRECATIONS}) == len(DEPRECATIONS)
    assert {entry.removed_in for entry in DEPRECATIONS} == {REMOVED_IN}
    # When this fails, the release that removes the deprecated names has come: delete them.
    assert _version(hf_dropgrad.__version__) < _version(REMOVED_IN)
    for entry in DEPRECATIONS:
        assert (0, 1, 0) < _version(entry.since) <= _version(hf_dropgrad.__version__), entry


@pytest.mark.parametrize("entry", ATTRIBUTES, ids=lambda entry: entry.old)
def test_every_deprecated_module_attribute_warns_and_resolves(entry: Deprecation) -> None:
    module = importlib.import_module(entry.module)
    with pytest.warns(FutureWarning) as record:
        value = getattr(module, entry.name)
    _check_warning(record, entry)
    assert value == entry.resolve() if entry.call else value is entry.resolve()
    new = _object(entry.new)
    assert new is not None, f"{entry.new!r} names nothing importable"
    if not entry.call:  # a move or a rename is the new object; a shim subclasses it
        assert value is new or (isinstance(value, type) and issubclass(value, new))


def test_the_module_hooks_refuse_other_names() -> None:
    for name in ("hf_dropgrad", "hf_dropgrad.engines", "hf_dropgrad.schedulers",
                 "hf_dropgrad.training_args"):
        with pytest.raises(AttributeError, match=f"module '{name}' has no attribute 'Nope'"):
            importlib.import_module(name).Nope  # noqa: B018


def _callback_config(tmp_path: Path) -> tuple[Callable[[], Any], Any]:
    args = DropGradTrainingArguments(str(tmp_path), dropgrad_rate=0.2)
    callback = DropGradCallback(scheduler="linear", final_rate=0.1)
    return (lambda: callback.config(args)), callback.settings(args)


def _args_dropgrad_config(tmp_path: Path) -> tuple[Callable[[], Any], Any]:
    args = DropGradTrainingArguments(str(tmp_path), dropgrad_rate=0.2, seed=3)
    return (lambda: args.dropgrad_config), DropGradSettings.from_args(args)


def _callbacks_install_dropgrad(tmp_path: Path) -> tuple[Callable[[], Any], Any]:
    import torch

    from hf_dropgrad import callbacks
    from hf_dropgrad.optimizer import DropGrad

    settings = DropGradSettings(drop_rate=0.2, seed=3)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    def call() -> tuple[type, float | None, int, Any]:
        dropgrad = callbacks.install_dropgrad(sgd, None, settings, 10)
        return type(dropgrad), dropgrad.drop_rate, dropgrad.seed, dropgrad.optimizer

    return call, (DropGrad, 0.2, 3, sgd)


#: Each deprecated method or property: how to call it, and what it must return.
CALLS: dict[str, Callable[[Path], tuple[Callable[[], Any], Any]]] = {
    "DropGradCallback.config(args)": _callback_config,
    "DropGradTrainingArguments.dropgrad_config": _args_dropgrad_config,
    "hf_dropgrad.callbacks.install_dropgrad(holder, model, settings, steps)":
        _callbacks_install_dropgrad,
}


def test_every_deprecated_method_has_a_call_here() -> None:
    assert set(CALLS) == {entry.old for entry in METHODS}


@pytest.mark.parametrize("entry", METHODS, ids=lambda entry: entry.old)
def test_every_deprecated_method_warns_and_returns_the_new_result(entry: Deprecation,
                                                                   tmp_path: Path) -> None:
    call, expected = CALLS[entry.old](tmp_path)
    with pytest.warns(FutureWarning) as record:
        value = call()
    _check_warning(record, entry)
    assert value == expected


def test_dropgrad_config_names_the_arguments_class_in_use(tmp_path: Path) -> None:
    from hf_dropgrad import DropGradSeq2SeqTrainingArguments

    args = DropGradSeq2SeqTrainingArguments(str(tmp_path))
    with pytest.warns(FutureWarning) as record:
        args.dropgrad_config  # noqa: B018
    (entry,) = (e for e in METHODS if e.name == "dropgrad_config")
    _check_warning(record, entry, as_written="DropGradSeq2SeqTrainingArguments.dropgrad_config")


def test_drop_grad_config_is_drop_grad_settings_under_its_old_name(tmp_path) -> None:
    with pytest.warns(FutureWarning, match=r"DropGradConfig is deprecated.*"
                                           r"use hf_dropgrad\.settings\.DropGradSettings"):
        from hf_dropgrad.training_args import DropGradConfig
    config = DropGradConfig(drop_rate=0.1, scheduler="linear")
    assert isinstance(config, DropGradSettings)
    assert config.scheduler_kwargs(num_training_steps=1000) == {
        "initial_drop_rate": 0.1, "final_drop_rate": 0.0, "num_steps": 1000,
    }
    assert config.scheduler_class_name == "LinearDropRateScheduler"
    args = DropGradTrainingArguments(str(tmp_path), dropgrad_rate=0.2, seed=3)
    # 0.1.0's signature: overrides as keywords
    resolved = DropGradConfig.from_args(args, drop_rate=0.3)
    assert (resolved.drop_rate, resolved.seed) == (0.3, 3)
    assert DropGradConfig.from_args(args) == DropGradSettings.from_args(args)


def test_dropgrad_schedulers_maps_names_to_class_names() -> None:
    from hf_dropgrad import training_args

    with pytest.warns(FutureWarning, match=r"DROPGRAD_SCHEDULERS .*settings\.SCHEDULERS"):
        old = training_args.DROPGRAD_SCHEDULERS
    assert old == {name: cls.__name__ for name, cls in SCHEDULERS.items()}
    assert old["cosine"] == "CosineAnnealingDropRateScheduler"


def test_changelog_records_this_release_and_its_deprecations() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", text, flags=re.M)
    assert releases[:2] == [hf_dropgrad.__version__, "0.1.0"]
    current = text.split("\n## [")[1]
    deprecated = current.split("### Deprecated")[1].split("\n### ")[0]
    for entry in DEPRECATIONS:
        where = entry.module or entry.old.partition(".")[0]
        assert entry.old in deprecated or (
            f"`{entry.name}`" in deprecated and where in deprecated), entry.old
    assert f"removed in {REMOVED_IN}" in deprecated
    assert re.findall(r"removed in (\d+\.\d+\.\d+)", text) == [REMOVED_IN]


def test_the_readme_and_the_sources_name_the_same_removal_release() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Deprecated names")[1].split("\n#")[0]
    assert re.findall(r"removed in (\d+\.\d+\.\d+)", section) == [REMOVED_IN]
    for entry in DEPRECATIONS:
        assert f"`{entry.name}" in section or entry.old in section, entry.old
    for path in (ROOT / "hf_dropgrad").rglob("*.py"):
        assert "future release" not in path.read_text(), path  # the table names the release

"""Names removed after 0.1.0 still work, with a FutureWarning naming the replacement
(hf_dropgrad/deprecated.py), and CHANGELOG.md records them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import hf_dropgrad

pytest.importorskip("transformers")

from hf_dropgrad import DropGradCallback, DropGradTrainingArguments
from hf_dropgrad.settings import SCHEDULERS, DropGradSettings

ROOT = Path(__file__).resolve().parent.parent


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
    with pytest.raises(AttributeError, match="Nope"):
        training_args.Nope  # noqa: B018


def test_callback_config_and_args_dropgrad_config(tmp_path) -> None:
    args = DropGradTrainingArguments(str(tmp_path), dropgrad_rate=0.2)
    callback = DropGradCallback(scheduler="linear", final_rate=0.1)
    with pytest.warns(FutureWarning, match=r"DropGradCallback\.config\(args\).*settings\(args\)"):
        old = callback.config(args)
    assert old == callback.settings(args)
    with pytest.warns(FutureWarning, match=r"dropgrad_config is deprecated.*"
                                           r"DropGradSettings\.from_args\(args\)"):
        assert args.dropgrad_config == DropGradSettings.from_args(args)


def test_the_aliases_go_in_the_release_the_warning_names() -> None:
    from hf_dropgrad import deprecated

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split("."))

    # When this fails, the release that removes the aliases has come: delete them.
    assert version(hf_dropgrad.__version__) < version(deprecated.REMOVED_IN)
    assert version(hf_dropgrad.__version__) > (0, 1, 0)


def test_changelog_records_this_release_and_its_deprecations() -> None:
    from hf_dropgrad import deprecated

    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", text, flags=re.M)
    assert releases[:2] == [hf_dropgrad.__version__, "0.1.0"]
    current = text.split("\n## [")[1]
    for name in ("DropGradConfig", "DROPGRAD_SCHEDULERS", "DropGradCallback.config(args)",
                 "dropgrad_config", deprecated.REMOVED_IN):
        assert name in current, name

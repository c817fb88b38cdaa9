"""The run configuration the experiment trackers log holds DropGrad's settings as used
(hf_dropgrad/run_config.py): ``args.to_dict()`` and what calls it, TensorBoard's event files."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_dropgrad import (  # noqa: E402
    DropGradCallback,
    DropGradTrainer,
    DropGradTrainingArguments,
)
from tests.trainer_helpers import classification_data, common, tiny_bert_classifier  # noqa: E402

#: The settings of a DropGradCallback on a plain TrainingArguments ...
CALLBACK = dict(drop_rate=0.1, module_rates={"bert.encoder": 0.2}, scheduler="step", step_size=2)
#: ... and the entries the run configuration must hold for them (the seed is args.seed).
ENTRIES = {
    "dropgrad_rate": 0.1,
    "dropgrad_module_rates": {"bert.encoder": 0.2},
    "dropgrad_scheduler": "step",
    "dropgrad_step_size": 2,
    "dropgrad_gamma": 0.5,
    "dropgrad_full_update_drop": False,
    "dropgrad_seed": 7,
}


def plain_trainer(out: Path, settings: dict | None, **kw) -> Trainer:
    trainer = Trainer(model=tiny_bert_classifier(),
                      args=TrainingArguments(**common(out, max_steps=2, **kw)),
                      train_dataset=classification_data())
    if settings is not None:
        DropGradCallback(**settings).attach(trainer)
    return trainer


def dropgrad_entries(config: dict) -> dict:
    return {k: v for k, v in config.items() if k.startswith("dropgrad_")}


@pytest.mark.slow
def test_run_config_holds_the_settings_of_a_callback_on_plain_arguments(tmp_path) -> None:
    # (Arguments built after the Trainer would reset Accelerate's state under it.)
    plain = TrainingArguments(**common(tmp_path, max_steps=2)).to_dict()
    trainer = plain_trainer(tmp_path, CALLBACK)
    args = trainer.args
    for when in ("attached", "trained"):
        if when == "trained":
            trainer.train()
        config = args.to_dict()
        assert dropgrad_entries(config) == ENTRIES, when
        assert {k: v for k, v in config.items() if k not in ENTRIES} == plain, when
        assert dropgrad_entries(json.loads(args.to_json_string())) == ENTRIES, when
        sanitized = args.to_sanitized_dict()  # TensorBoard's hparams: numbers and strings
        assert sanitized["dropgrad_module_rates"] == str({"bert.encoder": 0.2}), when
        assert sanitized["dropgrad_rate"] == 0.1, when

    # Saved (training_args.bin) or copied, the arguments are the class's own again: they load
    # without hf_dropgrad and hold no stale run.
    buffer = io.BytesIO()
    torch.save(args, buffer)
    assert b"hf_dropgrad" not in buffer.getvalue()
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(args)):
        assert other.to_dict() == plain


@pytest.mark.slow
def test_run_config_with_dropgrad_off_is_the_trainers(tmp_path) -> None:
    plain = TrainingArguments(**common(tmp_path, max_steps=2)).to_dict()
    trainer = plain_trainer(tmp_path, {})
    trainer.train()
    assert "to_dict" not in vars(trainer.args)
    assert trainer.args.to_dict() == plain


@pytest.mark.slow
def test_run_config_of_dropgrad_arguments_holds_the_values_as_used(tmp_path) -> None:
    # The fields say 0.1, no seed, a schedule without a length; the run used the keyword's 0.3,
    # args.seed and the run's 2 steps.
    args = DropGradTrainingArguments(
        **common(tmp_path, max_steps=2), dropgrad_rate=0.1, dropgrad_scheduler="linear"
    )
    trainer = DropGradTrainer(model=tiny_bert_classifier(), args=args,
                              train_dataset=classification_data(), dropgrad_rate=0.3)
    trainer.train()
    assert dropgrad_entries(args.to_dict()) == {
        "dropgrad_rate": 0.3,
        "dropgrad_module_rates": None,
        "dropgrad_scheduler": "linear",
        "dropgrad_final_rate": 0.0,
        "dropgrad_scheduler_steps": 2,
        "dropgrad_step_size": None,  # a field the schedule does not use: as the field says
        "dropgrad_gamma": 0.5,
        "dropgrad_full_update_drop": False,
        "dropgrad_seed": 7,
    }


@pytest.mark.slow
def test_tensorboard_logs_the_settings(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = plain_trainer(tmp_path, CALLBACK, report_to=["tensorboard"], logging_steps=1)
    trainer.train()
    (events,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    reader = EventAccumulator(str(events), size_guidance={"tensors": 0, "scalars": 0})
    reader.Reload()
    (logged,) = reader.Tensors("args/text_summary")
    config = json.loads(logged.tensor_proto.string_val[0].decode())
    assert dropgrad_entries(config) == ENTRIES
    assert config["seed"] == 7 and config["max_steps"] == 2
    # The rates each step used, as scalars next to the loss (the 'step' schedule halves them
    # after 2 steps: the run's two steps used the first rates); the last pair comes with the
    # run's summary (train_loss).
    for tag, rate in (("train/dropgrad_rate", 0.1), ("train/dropgrad_rate/bert.encoder", 0.2)):
        scalars = [(e.step, e.value) for e in reader.Scalars(tag)]
        assert [step for step, _ in scalars] == [1, 2, 2], tag
        assert [value for _, value in scalars] == pytest.approx([rate] * 3), tag

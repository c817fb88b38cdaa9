"""Model cards of runs trained with DropGrad (hf_dropgrad/model_card.py): the settings as used,
the tags, the version and the citations, through DropGradTrainer, DropGradCallback.attach and
TRL's own cards; with DropGrad off, the Trainer's card byte for byte."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")

from transformers import (  # noqa: E402
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)

import hf_dropgrad  # noqa: E402
from hf_dropgrad import (  # noqa: E402
    DropGrad,
    DropGradCallback,
    DropGradSeq2SeqTrainer,
    DropGradSeq2SeqTrainingArguments,
)
from hf_dropgrad.model_card import TAGS, add_to_card, card_lines  # noqa: E402
from tests.trainer_helpers import (  # noqa: E402
    classification_data,
    common,
    seq2seq_data,
    tiny_bert_classifier,
    tiny_sft,
    tiny_t5,
)

VERSION = hf_dropgrad.__version__

#: The issue's run: every setting away from its default (the schedule's length is the run's).
FLAGS = dict(
    dropgrad_rate=0.15, dropgrad_module_rates="encoder=0.1,decoder=0.2",
    dropgrad_scheduler="linear", dropgrad_full_update_drop=True, dropgrad_seed=11,
)
CALLBACK = dict(
    drop_rate=0.15, module_rates={"encoder": 0.1, "decoder": 0.2}, scheduler="linear",
    full_update_drop=True, seed=11,
)
#: What the card must say of them after a 4-step run.
SETTING_LINES = [
    "- dropgrad_rate: 0.15",
    '- dropgrad_module_rates: {"encoder": 0.1, "decoder": 0.2}',
    "- dropgrad_scheduler: linear",
    "- dropgrad_final_rate: 0.0",
    "- dropgrad_scheduler_steps: 4",
    "- dropgrad_full_update_drop: True",
    "- dropgrad_seed: 11",
]


def read_card(folder: Path) -> tuple[dict, str, str]:
    """(metadata, body, whole text) of the README.md a trainer wrote in ``folder``."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body, text


def section(body: str, heading: str) -> list[str]:
    """The lines of the section under ``heading`` (up to the next heading)."""
    lines = body.split("\n")
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return [line for line in lines[start:end] if line]


def stub_hub_upload(monkeypatch) -> list[str]:
    """``Trainer.push_to_hub`` without the Hub: the upload is recorded, not sent."""
    import transformers.trainer as trainer_module

    uploads: list[str] = []

    def upload_folder(**kwargs):
        uploads.append(kwargs["folder_path"])

    if hasattr(trainer_module, "hf_api"):  # transformers 5
        monkeypatch.setattr(trainer_module, "hf_api",
                            lambda: SimpleNamespace(upload_folder=upload_folder))
    if hasattr(trainer_module, "upload_folder"):  # transformers 4.56/4.57
        monkeypatch.setattr(trainer_module, "upload_folder", upload_folder)
    return uploads


def push(trainer, monkeypatch) -> None:
    uploads = stub_hub_upload(monkeypatch)
    trainer.hub_model_id = "someone/tiny"  # no repository to create
    trainer.push_to_hub()
    assert uploads == [trainer.args.output_dir]


def seq2seq_trainer(out: Path, path: str, **kw) -> Seq2SeqTrainer:
    """A 4-step Seq2Seq run with the issue's settings through ``path``, or without DropGrad
    (``path="plain"``); ``kw`` goes to the arguments."""
    base = common(out, max_steps=4, **kw)
    if path == "trainer":
        args = DropGradSeq2SeqTrainingArguments(**base, **FLAGS)
        return DropGradSeq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=seq2seq_data())
    trainer = Seq2SeqTrainer(
        model=tiny_t5(), args=Seq2SeqTrainingArguments(**base), train_dataset=seq2seq_data()
    )
    if path == "callback":
        DropGradCallback(**CALLBACK).attach(trainer)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("path", ["trainer", "callback"])
def test_card_names_every_setting_the_tags_and_the_version(tmp_path, monkeypatch, path) -> None:
    trainer = seq2seq_trainer(tmp_path / "dropgrad" / "out", path)
    trainer.train()
    trainer.create_model_card()
    meta, body, card = read_card(tmp_path / "dropgrad" / "out")

    assert set(TAGS) <= set(meta["tags"]) and "generated_from_trainer" in meta["tags"]
    hyper = section(body, "### Training hyperparameters")
    assert hyper[0] == "The following hyperparameters were used during training:"
    assert hyper[-len(SETTING_LINES):] == SETTING_LINES
    (optimizer,) = [line for line in hyper if line.startswith("- optimizer: ")]
    assert optimizer.endswith(", wrapped by DropGrad (gradient dropout; the dropgrad_* settings "
                              "below)")
    assert f"- hf_dropgrad {VERSION}" in section(body, "### Framework versions")
    citations = "\n".join(section(body, "## Citations"))
    assert "DropGrad (gradient dropout)" in citations
    assert "@software{hf_dropgrad," in citations and f"version = {{{VERSION}}}" in citations
    assert "https://huggingface.co/papers/2004.05859" in citations  # Tseng et al., 2020

    # The card and the checkpoint's record (trainer_state.json) say the same.
    record = trainer.state.stateful_callbacks["hf_dropgrad"]["attributes"]["settings"]
    assert card_lines(record) == SETTING_LINES

    # Everything the Trainer's own card says is still there, in order (the optimizer line
    # extended): DropGrad's part is added, nothing is rewritten.
    plain = seq2seq_trainer(tmp_path / "plain" / "out", "plain")
    plain.train()
    plain.create_model_card()
    lines = iter(card.split("\n"))
    for line in read_card(tmp_path / "plain" / "out")[2].split("\n"):
        assert any(ours.startswith(line) for ours in lines), line

    # push_to_hub writes the same card (the model's tags now come in through it too).
    push(trainer, monkeypatch)
    assert read_card(tmp_path / "dropgrad" / "out")[2] == card


@pytest.mark.slow
@pytest.mark.parametrize("path", ["trainer", "callback"])
def test_card_with_dropgrad_off_is_the_trainers_byte_for_byte(tmp_path, monkeypatch, path) -> None:
    cards = {}
    for name in ("plain", path):
        out = tmp_path / name / "out"  # same folder name: the card's model name
        base = common(out, max_steps=2)
        if name == "plain":
            trainer = Seq2SeqTrainer(model=tiny_t5(), args=Seq2SeqTrainingArguments(**base),
                                     train_dataset=seq2seq_data())
        elif name == "trainer":
            trainer = DropGradSeq2SeqTrainer(
                model=tiny_t5(), args=DropGradSeq2SeqTrainingArguments(**base),
                train_dataset=seq2seq_data(),
            )
        else:
            trainer = Seq2SeqTrainer(model=tiny_t5(), args=Seq2SeqTrainingArguments(**base),
                                     train_dataset=seq2seq_data())
            DropGradCallback().attach(trainer)
        trainer.train()
        trainer.create_model_card()
        created = (out / "README.md").read_bytes()
        push(trainer, monkeypatch)
        cards[name] = (created, (out / "README.md").read_bytes())
        assert getattr(trainer.model, "model_tags", None) is None
    assert cards[path] == cards["plain"]
    assert b"hf_dropgrad" not in cards[path][1]


@pytest.mark.slow
def test_trl_card_gets_dropgrads_part(tmp_path) -> None:
    trainer = tiny_sft(tmp_path / "out", {"module_rates": {"transformer.h": 0.3}, "seed": 5})
    trainer.train()
    trainer.create_model_card()
    meta, body, card = read_card(tmp_path / "out")
    assert {"trl", "sft", *TAGS} <= set(meta["tags"])
    optim = trainer.args.optim.value  # the default optimizer's name (it differs by release)
    assert section(body, "### Training hyperparameters") == [
        "The following DropGrad hyperparameters were used during training:",
        f"- optimizer: {optim}, wrapped by DropGrad (gradient dropout; the dropgrad_* settings "
        "below)",
        "- dropgrad_rate: 0.0",
        '- dropgrad_module_rates: {"transformer.h": 0.3}',
        "- dropgrad_scheduler: constant",
        "- dropgrad_full_update_drop: False",
        "- dropgrad_seed: 5",
    ]
    versions = section(body, "### Framework versions")
    assert versions[0].startswith("- TRL: ") and versions[-1] == f"- hf_dropgrad: {VERSION}"
    # TRL's citation stays, DropGrad's follows it.
    assert card.index("Cite TRL as:") < card.index("Cite hf_dropgrad as:")


@pytest.mark.slow
def test_trl_card_with_dropgrad_off_is_trls_byte_for_byte(tmp_path) -> None:
    cards = []
    for name, settings in (("plain", None), ("off", {})):
        trainer = tiny_sft(tmp_path / name / "out", settings)
        trainer.train()
        trainer.create_model_card()
        cards.append((tmp_path / name / "out" / "README.md").read_bytes())
    assert cards[0] == cards[1]


@pytest.mark.slow
def test_card_of_a_dropgrad_passed_through_optimizers(tmp_path) -> None:
    model = tiny_bert_classifier()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer = DropGrad(inner, drop_rate=0.2, model=model, seed=3)
    trainer = Trainer(model=model, args=TrainingArguments(**common(tmp_path, max_steps=2)),
                      train_dataset=classification_data(), optimizers=(optimizer, None))
    DropGradCallback().attach(trainer)
    trainer.train()
    trainer.create_model_card()
    hyper = section(read_card(tmp_path)[1], "### Training hyperparameters")
    assert hyper[-4:] == [
        '- dropgrad_rates: {"default": 0.2}',
        "- dropgrad_scheduler: constant",
        "- dropgrad_full_update_drop: False",
        "- dropgrad_seed: 3",
    ]


@pytest.mark.slow
def test_callback_added_with_add_callback_tags_the_model(tmp_path) -> None:
    # Without attach() the callback never sees the trainer, so the card is the Trainer's; the
    # model's tags (which push_to_hub puts on the card) still say DropGrad.
    trainer = Trainer(model=tiny_bert_classifier(),
                      args=TrainingArguments(**common(tmp_path, max_steps=1)),
                      train_dataset=classification_data())
    trainer.add_callback(DropGradCallback(drop_rate=0.1))
    trainer.train()
    assert set(TAGS) <= set(trainer.model.model_tags)


# -- the card text, without a Trainer ---------------------------------------------------------

TRAINER_CARD = """\
---
library_name: transformers
tags:
- generated_from_trainer
model-index:
- name: out
  results: []
---

# out

## Training procedure

### Training hyperparameters

The following hyperparameters were used during training:
- learning_rate: 0.01
- seed: 7
- optimizer: Use sgd and the args are:
No additional optimizer arguments
- num_epochs: 3

### Training results

| Training Loss | Epoch | Step | Validation Loss |
|:-------------:|:-----:|:----:|:---------------:|
| No log        | 1.0   | 4    | 4.5             |


### Framework versions

- Transformers 5.0.0
- Pytorch 2.13.0
"""

RECORD = {"drop_rate": 0.1, "module_rates": None, "scheduler": "step", "full_update_drop": False,
          "seed": 7, "step_size": 5, "gamma": 0.5}


def test_add_to_card_extends_the_lists_and_keeps_the_rest() -> None:
    card = add_to_card(TRAINER_CARD, RECORD, optimizer="sgd")
    hyper = section(card, "### Training hyperparameters")
    assert hyper == [
        "The following hyperparameters were used during training:",
        "- learning_rate: 0.01",
        "- seed: 7",
        "- optimizer: Use sgd and the args are:",
        "No additional optimizer arguments, wrapped by DropGrad (gradient dropout; the "
        "dropgrad_* settings below)",
        "- num_epochs: 3",
        "- dropgrad_rate: 0.1",
        "- dropgrad_module_rates: None",
        "- dropgrad_scheduler: step",
        "- dropgrad_step_size: 5",
        "- dropgrad_gamma: 0.5",
        "- dropgrad_full_update_drop: False",
        "- dropgrad_seed: 7",
    ]
    assert section(card, "### Training results") == section(TRAINER_CARD, "### Training results")
    assert section(card, "### Framework versions") == [
        "- Transformers 5.0.0", "- Pytorch 2.13.0", f"- hf_dropgrad {VERSION}",
    ]
    assert card.startswith(TRAINER_CARD.split("### Training hyperparameters")[0])
    assert add_to_card(card, RECORD, optimizer="sgd") == card  # once


def test_add_to_card_gives_a_card_without_lists_its_own() -> None:
    card = add_to_card("# A card\n\nSome text.\n", RECORD, optimizer="adamw_torch")
    assert section(card, "### Training hyperparameters")[:2] == [
        "The following DropGrad hyperparameters were used during training:",
        "- optimizer: adamw_torch, wrapped by DropGrad (gradient dropout; the dropgrad_* "
        "settings below)",
    ]
    assert section(card, "### Framework versions") == [f"- hf_dropgrad {VERSION}"]
    assert card.startswith("# A card\n\nSome text.\n") and "\n## Citations\n" in card

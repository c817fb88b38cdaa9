"""DropGradTrainer and DropGradSeq2SeqTrainer (hf_dropgrad/trainer.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import (  # noqa: E402
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_dropgrad import (  # noqa: E402
    DropGrad,
    DropGradCallback,
    DropGradSeq2SeqTrainer,
    DropGradSeq2SeqTrainingArguments,
    DropGradTrainer,
    DropGradTrainingArguments,
    get_dropgrad,
)
from hf_dropgrad import functional as F  # noqa: E402
from tests.trainer_helpers import (  # noqa: E402
    RecordLogs,
    classification_data,
    common,
    params_of,
    seq2seq_data,
    tiny_bert_classifier,
    tiny_t5,
)

pytestmark = pytest.mark.slow


def test_seq2seq_with_module_rates_logs_rates_and_the_table(tmp_path, transformers_logs) -> None:
    args = DropGradSeq2SeqTrainingArguments(
        **common(tmp_path, max_steps=4), dropgrad_module_rates="encoder=0.1,decoder=0.2"
    )
    trainer = DropGradSeq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=seq2seq_data())
    trainer.train()
    out = transformers_logs.text
    assert "DropGrad rates" in out and "encoder" in out and "decoder" in out
    dropgrad = get_dropgrad(trainer)
    assert isinstance(dropgrad, DropGrad) and dropgrad.step_count == 4
    rates = dropgrad.current_rates()
    for name, rate in rates.items():
        if name.startswith("decoder."):
            assert rate == 0.2, name
        elif name.startswith("encoder."):
            assert rate == 0.1, name
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert entry["dropgrad_rate/encoder"] == 0.1
        assert entry["dropgrad_rate/decoder"] == 0.2


def test_schedule_length_defaults_to_the_run_and_is_logged(tmp_path) -> None:
    args = DropGradTrainingArguments(
        **common(tmp_path, max_steps=4, logging_steps=1),
        dropgrad_rate=0.4, dropgrad_scheduler="linear", dropgrad_final_rate=0.0,
    )
    trainer = DropGradTrainer(
        model=tiny_bert_classifier(), args=args, train_dataset=classification_data()
    )
    trainer.train()
    logged = [e["dropgrad_rate"] for e in trainer.state.log_history if "loss" in e]
    # each log shows the rate its step used, as learning_rate does
    assert logged == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert get_dropgrad(trainer).drop_rate_scheduler.num_steps == 4


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


@pytest.mark.parametrize("use_callback", [False, True])
def test_resume_is_bit_identical(tmp_path, use_callback: bool) -> None:
    settings = dict(dropgrad_rate=0.3, dropgrad_scheduler="cosine", dropgrad_final_rate=0.05)

    def make(out: Path, callbacks=()) -> Trainer:
        kw = common(out, max_steps=6, logging_steps=1, save_strategy="steps", save_steps=100)
        if use_callback:
            trainer = Trainer(
                model=tiny_t5(), args=TrainingArguments(**kw), train_dataset=seq2seq_data(),
                callbacks=list(callbacks),
            )
            trainer.add_callback(DropGradCallback(
                drop_rate=0.3, scheduler="cosine", final_rate=0.05
            ))
            return trainer
        args = DropGradTrainingArguments(**kw, **settings)
        return DropGradTrainer(
            model=tiny_t5(), args=args, train_dataset=seq2seq_data(), callbacks=list(callbacks)
        )

    full = make(tmp_path / "full")
    full.train()
    half = make(tmp_path / "half", callbacks=[StopAt(3)])
    half.train()
    assert half.state.global_step == 3
    resumed = make(tmp_path / "half")
    resumed.train(resume_from_checkpoint=str(tmp_path / "half" / "checkpoint-3"))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    losses = lambda t: [(e["step"], e["loss"], e["dropgrad_rate"]) for e in t.state.log_history
                        if "loss" in e]
    assert losses(resumed)[-3:] == losses(full)[-3:]
    # the checkpoint is plain data: what Trainer loads with weights_only=True
    state = torch.load(tmp_path / "half" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert state["dropgrad"]["step"] == 3


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd"])
def test_wraps_the_optimizer_the_trainer_builds(tmp_path, optim: str) -> None:
    kw = common(tmp_path, max_steps=2, optim=optim)
    args = DropGradTrainingArguments(**kw, dropgrad_rate=0.2)
    trainer = DropGradTrainer(
        model=tiny_bert_classifier(), args=args, train_dataset=classification_data()
    )
    trainer.train()
    dropgrad = get_dropgrad(trainer)
    assert dropgrad.step_count == 2
    expected = {"sgd": "SGD", "adafactor": "Adafactor"}.get(optim, "AdamW")
    assert type(dropgrad.optimizer).__name__ == expected
    assert all(r == 0.2 for r in dropgrad.current_rates().values())


def test_wraps_an_optimizer_passed_through_optimizers(tmp_path) -> None:
    model = tiny_bert_classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    params = list(model.parameters())
    # what reaches the optimizer passed in: after clipping (unmasked), and at its step (masked)
    unmasked: list[list[torch.Tensor]] = []
    stepped: list[list[torch.Tensor]] = []

    class Before(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            unmasked.append([p.grad.clone() for p in params])

    opt.register_step_pre_hook(lambda *_: stepped.append([p.grad.clone() for p in params]))
    trainer = DropGradTrainer(
        model=model, args=TrainingArguments(**common(tmp_path, max_steps=2)),
        train_dataset=classification_data(), optimizers=(opt, sched), dropgrad_rate=0.1,
        callbacks=[Before()],
    )
    trainer.train()
    dropgrad = get_dropgrad(trainer)
    assert dropgrad.optimizer is opt
    assert len(unmasked) == len(stepped) == 2
    threshold = F.drop_threshold(0.1)
    for step, (before, after) in enumerate(zip(unmasked, stepped)):
        for index, (g, m) in enumerate(zip(before, after)):
            keep = F.keep_mask(g.numel(), F.derive_key(dropgrad.seed, step, index), threshold)
            want = torch.where(keep.view_as(g), g * F.keep_scale(threshold), 0.0)
            assert torch.equal(m, want), (step, index)
    dropped = sum(int(((m == 0) & (g != 0)).sum()) for g, m in zip(unmasked[0], stepped[0]))
    assert dropped > 0  # opt stepped masked gradients


def test_one_mask_per_optimizer_step_over_the_accumulated_gradient(tmp_path) -> None:
    args = DropGradTrainingArguments(
        **common(tmp_path, max_steps=3, gradient_accumulation_steps=2, max_grad_norm=0.05),
        dropgrad_rate=0.5, optim="sgd",
    )
    trainer = DropGradTrainer(
        model=tiny_bert_classifier(), args=args, train_dataset=classification_data(64)
    )
    seen: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            dropgrad = get_dropgrad(optimizer)
            params = [p for g in dropgrad.param_groups for p in g["params"]]
            before: list[torch.Tensor] = []
            dropgrad.register_step_pre_hook(
                lambda *a: before.__setitem__(slice(None), [p.grad.clone() for p in params])
            )
            dropgrad.optimizer.register_step_pre_hook(
                lambda *a: seen.append((dropgrad.step_count, list(before),
                                        [p.grad.clone() for p in params]))
            )

    trainer.add_callback(Spy())
    trainer.train()
    assert [s[0] for s in seen] == [0, 1, 2]  # one masking per optimizer step
    t = F.drop_threshold(0.5)
    for step, accumulated, masked in seen:
        # clipping ran before the mask: the unmasked accumulated gradient has norm <= 0.05
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in accumulated]))
        assert norm <= 0.05 + 1e-6
        for index, (g, m) in enumerate(zip(accumulated, masked)):
            expected = g.clone()
            F.mask_reference_(expected, F.derive_key(7, step, index), t, F.keep_scale(t))
            assert torch.equal(expected, m)


def test_peft_lora_only_trainable_parameters_get_masks(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_t5(), peft.LoraConfig(r=2, target_modules=["q", "v"], lora_alpha=4)
    )
    args = DropGradSeq2SeqTrainingArguments(
        **common(tmp_path, max_steps=2), dropgrad_module_rates="encoder=0.1,decoder=0.2"
    )
    trainer = DropGradSeq2SeqTrainer(model=model, args=args, train_dataset=seq2seq_data())
    trainer.train()
    rates = get_dropgrad(trainer).current_rates()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(rates) == trainable and rates
    for name, rate in rates.items():
        assert "lora_" in name and name.startswith("base_model.model.")
        assert rate == (0.1 if ".encoder." in name else 0.2)


def test_bad_settings_fail_before_training(tmp_path) -> None:
    args = DropGradSeq2SeqTrainingArguments(
        **common(tmp_path, max_steps=2), dropgrad_module_rates="encodr=0.1"
    )
    with pytest.raises(ValueError, match="dropgrad_module_rates") as info:
        DropGradSeq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=seq2seq_data())
    assert "encoder" in str(info.value)  # the closest real name is suggested
    with pytest.raises(ValueError, match="drop_rate"):
        DropGradCallback(drop_rate=1.5)
    with pytest.raises(ValueError, match=r"dropgrad_rate=\.\.\.\): must be a number in"):
        DropGradTrainer(
            model=tiny_bert_classifier(), args=TrainingArguments(**common(tmp_path)),
            dropgrad_rate="high",
        )


def test_checkpoint_and_arguments_are_saved(tmp_path) -> None:
    args = DropGradTrainingArguments(
        **common(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        dropgrad_module_rates="bert=0.1",
    )
    trainer = DropGradTrainer(
        model=tiny_bert_classifier(), args=args, train_dataset=classification_data()
    )
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["log_history"][0]["dropgrad_rate/bert"] == 0.1
    saved = torch.load(ckpt / "training_args.bin", weights_only=False)
    assert saved.dropgrad_module_rates == {"bert": 0.1}


# -- honest logs, no silent overrides, messages that name what the user passed -----------------


def test_logged_rate_is_the_rate_the_logged_step_used(tmp_path) -> None:
    # A step's learning_rate is logged as the value that step used; dropgrad_rate follows suit.
    args = DropGradTrainingArguments(
        **common(tmp_path, max_steps=4, logging_steps=1),
        dropgrad_rate=0.8, dropgrad_scheduler="linear", dropgrad_final_rate=0.0,
    )
    reporter = RecordLogs()
    trainer = DropGradTrainer(
        model=tiny_bert_classifier(), args=args, train_dataset=classification_data(),
        callbacks=[reporter],
    )
    used = []

    class MeasureDrop(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            used.append(get_dropgrad(trainer).drop_rate_scheduler.rate_at(state.global_step))

    trainer.add_callback(MeasureDrop())
    trainer.train()
    logged = [e["dropgrad_rate"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert logged == pytest.approx(used)
    assert [e["dropgrad_rate"] for e in reporter.seen if "loss" in e] == pytest.approx(logged)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_create_optimizer_and_scheduler_by_hand(tmp_path, kind: str) -> None:
    args = DropGradTrainingArguments(
        **common(tmp_path, max_steps=6), dropgrad_rate=0.4, dropgrad_scheduler=kind,
    )
    trainer = DropGradTrainer(
        model=tiny_bert_classifier(), args=args, train_dataset=classification_data()
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=6)
    dropgrad = get_dropgrad(trainer.optimizer)
    assert dropgrad is not None and dropgrad.drop_rate_scheduler.num_steps == 6
    trainer.train()  # the optimizer built by hand is the one that trains
    assert get_dropgrad(trainer) is dropgrad and dropgrad.step_count == 6


def test_dropgrad_passed_through_optimizers_conflicts_with_dropgrad_settings(tmp_path) -> None:
    model = tiny_bert_classifier()
    mine = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.0)
    args = DropGradTrainingArguments(
        **common(tmp_path, max_steps=2), dropgrad_rate=1.0,
        dropgrad_module_rates={"bert.encoder": 1.0},
    )
    with pytest.raises(ValueError, match="optimizers=") as info:
        DropGradTrainer(
            model=model, args=args, train_dataset=classification_data(), optimizers=(mine, None)
        )
    assert "--dropgrad_rate" in str(info.value) and "--dropgrad_module_rates" in str(info.value)
    # The callback on another Trainer: refused before the first step, naming its keyword.
    trainer = Trainer(
        model=model, args=TrainingArguments(**common(tmp_path, max_steps=2)),
        train_dataset=classification_data(), optimizers=(mine, None),
    )
    trainer.add_callback(DropGradCallback(drop_rate=0.5))
    before = params_of(model)
    with pytest.raises(ValueError, match="drop_rate="):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dropgrad_passed_through_optimizers_is_used_and_named_after_the_model(
    tmp_path, transformers_logs
) -> None:
    model = tiny_bert_classifier()
    mine = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.25)
    trainer = DropGradTrainer(
        model=model, args=DropGradTrainingArguments(**common(tmp_path, max_steps=2)),
        train_dataset=classification_data(), optimizers=(mine, None),
    )
    trainer.train()
    assert get_dropgrad(trainer) is mine
    names = list(mine.current_rates())
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    table = transformers_logs.text
    assert "bert.embeddings.word_embeddings.weight" in table
    assert [e["dropgrad_rate"] for e in trainer.state.log_history if "loss" in e] == [0.25]


def _comparable(history: list[dict]) -> list[dict]:
    timing = ("runtime", "per_second")
    return [{k: v for k, v in e.items() if not any(t in k for t in timing)} for e in history]


@pytest.mark.parametrize("use_dropgrad_args", [True, False])
def test_dropgrad_off_is_indistinguishable_from_trainer(tmp_path, use_dropgrad_args) -> None:
    kw = common(tmp_path, max_steps=4, logging_steps=1)
    ref_reporter, reporter = RecordLogs(), RecordLogs()
    ref = Trainer(
        model=tiny_bert_classifier(), args=TrainingArguments(**kw),
        train_dataset=classification_data(), callbacks=[ref_reporter],
    )
    ref.train()
    args = DropGradTrainingArguments(**kw) if use_dropgrad_args else TrainingArguments(**kw)
    trainer = DropGradTrainer(
        model=tiny_bert_classifier(), args=args, train_dataset=classification_data(),
        callbacks=[reporter],
    )
    trainer.train()
    assert _comparable(trainer.state.log_history) == _comparable(ref.state.log_history)
    assert _comparable(reporter.seen) == _comparable(ref_reporter.seen)
    for a, b in zip(ref.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)
    # The one documented difference: one more callback, first.
    ref_callbacks = [type(cb) for cb in ref.callback_handler.callbacks]
    assert [type(cb) for cb in trainer.callback_handler.callbacks] == [
        DropGradCallback, *ref_callbacks
    ]


def test_dropgrad_off_matches_trainer_with_eval_accumulation_and_checkpoints(tmp_path) -> None:
    """What transformers' own Trainer tests exercise most, at rate 0: evaluation rows,
    gradient accumulation and checkpoints are those of Trainer."""

    def run(cls: type, out: Path) -> Trainer:
        kw = common(
            out, max_steps=4, logging_steps=1, gradient_accumulation_steps=2,
            eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        )
        trainer = cls(
            model=tiny_bert_classifier(), args=TrainingArguments(**kw),
            train_dataset=classification_data(), eval_dataset=classification_data(16),
        )
        trainer.train()
        return trainer

    ref, trainer = run(Trainer, tmp_path / "ref"), run(DropGradTrainer, tmp_path / "dropgrad")
    assert any("eval_loss" in e for e in ref.state.log_history)
    assert _comparable(trainer.state.log_history) == _comparable(ref.state.log_history)
    for a, b in zip(ref.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        ref_dir, dir_ = tmp_path / "ref" / checkpoint, tmp_path / "dropgrad" / checkpoint
        assert sorted(p.name for p in dir_.iterdir()) == sorted(p.name for p in ref_dir.iterdir())
        states = [json.loads((d / "trainer_state.json").read_text()) for d in (ref_dir, dir_)]
        assert _comparable(states[1]["log_history"]) == _comparable(states[0]["log_history"])


def test_pattern_matching_only_frozen_parameters_says_so(tmp_path) -> None:
    model = tiny_bert_classifier()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    args = DropGradTrainingArguments(
        **common(tmp_path, max_steps=2), dropgrad_module_rates="embeddings=0.1"
    )
    with pytest.raises(ValueError, match="do not train") as info:
        DropGradTrainer(model=model, args=args, train_dataset=classification_data())
    assert "--dropgrad_module_rates" in str(info.value)
    assert "no close name" not in str(info.value)


def test_messages_name_what_the_user_passed(tmp_path) -> None:
    trainer = Trainer(
        model=tiny_bert_classifier(), args=TrainingArguments(**common(tmp_path, max_steps=2)),
        train_dataset=classification_data(),
    )
    trainer.add_callback(DropGradCallback(module_rates={"encodr": 0.1}))
    # Each message starts with what the user wrote: the flag, or the call and its keyword.
    with pytest.raises(ValueError, match=r"^DropGradCallback\(module_rates=\.\.\.\): ") as info:
        trainer.train()
    assert "params" not in str(info.value)
    with pytest.raises(ValueError, match=r"^DropGradTrainer\(dropgrad_rate=\.\.\.\): must be"):
        DropGradTrainer(
            model=tiny_bert_classifier(), args=TrainingArguments(**common(tmp_path)),
            dropgrad_rate=1.5,
        )
    with pytest.raises(ValueError, match=r"^DropGradCallback\(drop_rate=\.\.\.\): must be"):
        DropGradCallback(drop_rate=1.5)
    with pytest.raises(ValueError, match=r"^--dropgrad_rate: must be"):
        DropGradTrainingArguments(**common(tmp_path), dropgrad_rate=1.5)


def test_unused_setting_warns_once_naming_the_flag(tmp_path) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = DropGradTrainingArguments(
            **common(tmp_path, max_steps=2), dropgrad_rate=0.1, dropgrad_final_rate=0.2
        )
        DropGradTrainer(
            model=tiny_bert_classifier(), args=args, train_dataset=classification_data()
        ).train()
    ignored = [str(w.message) for w in caught if "ignored" in str(w.message)]
    assert len(ignored) == 1 and "--dropgrad_final_rate" in ignored[0], ignored
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DropGradTrainer(
            model=tiny_bert_classifier(), args=TrainingArguments(**common(tmp_path, max_steps=2)),
            train_dataset=classification_data(), dropgrad_rate=0.1, dropgrad_final_rate=0.2,
        ).train()
    ignored = [str(w.message) for w in caught if "ignored" in str(w.message)]
    assert ignored == [
        "DropGradTrainer(dropgrad_final_rate=...) is ignored with "
        "DropGradTrainer(dropgrad_scheduler=...) 'constant'."
    ]


@pytest.mark.parametrize("use_callback", [False, True])
def test_a_forced_backend_that_cannot_take_the_model_fails_before_the_first_forward(
    tmp_path, monkeypatch, use_callback: bool
) -> None:
    # Issue 18: HF_DROPGRAD_BACKEND=cpp with a float64 model failed inside the first
    # optimizer.step(), after a full forward and backward.
    from hf_dropgrad import kernels
    from hf_dropgrad.kernels import cpp

    if cpp.load() is None:
        pytest.skip("the cpp backend is not available here")
    monkeypatch.setenv(kernels.ENV, "cpp")
    model = tiny_t5().double()
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    kw = common(tmp_path, max_steps=2)
    if use_callback:
        trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=seq2seq_data())
        DropGradCallback(drop_rate=0.1).attach(trainer)
    else:
        args = DropGradTrainingArguments(**kw, dropgrad_rate=0.1)
        trainer = DropGradTrainer(model=model, args=args, train_dataset=seq2seq_data())
    with pytest.raises(kernels.BackendUnavailableError,
                       match=r"HF_DROPGRAD_BACKEND=cpp cannot mask the gradient of shared\.weight "
                             r"\(torch\.float64"):
        trainer.train()
    assert not forwards


class MaskProbe(TrainerCallback):
    """Keeps, per optimizer step, one parameter's gradient before and after DropGrad masked it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._before: torch.Tensor | None = None

    def _param(self, model):
        return dict(model.named_parameters())[self.name]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._before = self._param(model).grad.detach().clone()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # keyed by the 0-based optimizer step (global_step is incremented after this event)
        self.steps[state.global_step] = (self._before, self._param(model).grad.detach().clone())


def _position(dropgrad: DropGrad, param: torch.Tensor) -> int:
    flat = [p for group in dropgrad.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(flat) if p is param)


RESUME_FLAGS = ["--dropgrad_seed", "1", "--dropgrad_rate", "0.8", "--dropgrad_scheduler", "linear"]


@pytest.mark.parametrize(
    ("changed", "rates", "seed", "named"),
    [
        ([], [0.4, 0.2], 1, []),
        (["--dropgrad_seed", "999", "--dropgrad_rate", "0.4"], [0.2, 0.1], 999,
         ["--dropgrad_seed 1 -> 999", "--dropgrad_rate 0.8 -> 0.4"]),
        (["--dropgrad_final_rate", "0.4"], [0.6, 0.5], 1, ["--dropgrad_final_rate 0 -> 0.4"]),
        (["--dropgrad_scheduler", "constant"], [0.8, 0.8], 1,
         ["--dropgrad_scheduler linear -> constant"]),
    ],
    ids=["unchanged", "seed-and-rate", "final-rate", "schedule-kind"],
)
def test_resume_with_changed_flags_applies_them_from_the_resumed_step_and_says_so(
    tmp_path, transformers_logs, changed: list[str], rates: list[float], seed: int,
    named: list[str],
) -> None:
    # Issue 18: the checkpoint's seed and schedule silently won over the resumed run's flags.
    from transformers import HfArgumentParser

    def make(flags: list[str], callbacks=()) -> DropGradTrainer:
        base = ["--output_dir", str(tmp_path), "--max_steps", "4", "--logging_steps", "1",
                "--save_strategy", "steps", "--save_steps", "100", "--per_device_train_batch_size",
                "8", "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "--seed", "7",
                "--disable_tqdm", "true"]
        (args,) = HfArgumentParser(DropGradTrainingArguments).parse_args_into_dataclasses(
            base + flags
        )
        return DropGradTrainer(model=tiny_t5(), args=args, train_dataset=seq2seq_data(),
                               callbacks=list(callbacks))

    make(RESUME_FLAGS, callbacks=[StopAt(2)]).train()
    probe = MaskProbe("decoder.block.0.layer.2.DenseReluDense.wi.weight")
    resumed = make(RESUME_FLAGS + changed, callbacks=[probe])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    logged = [e["dropgrad_rate"] for e in resumed.state.log_history if "loss" in e]
    assert logged[-2:] == pytest.approx(rates)  # steps 3 and 4
    dropgrad = get_dropgrad(resumed)
    assert dropgrad.seed == seed
    index = _position(dropgrad, probe._param(resumed.model))
    for step, rate in zip((2, 3), rates):  # 0-based optimizer steps of the resumed run
        before, after = probe.steps[step]
        threshold = F.drop_threshold(rate)
        F.mask_reference_(before, F.derive_key(seed, step, index), threshold,
                          F.keep_scale(threshold))
        assert torch.equal(before, after), step
    warnings = [line for line in transformers_logs.text.splitlines() if "differ" in line]
    if named:
        assert len(warnings) == 1, warnings
        for change in named:
            assert change in warnings[0]
        assert "from step 2 on" in warnings[0]
    else:
        assert not warnings


def test_resume_with_a_changed_callback_seed_says_so(tmp_path, transformers_logs) -> None:
    def make(seed: int, callbacks=()) -> Trainer:
        kw = common(tmp_path, max_steps=4, logging_steps=1, save_strategy="steps", save_steps=100)
        trainer = Trainer(model=tiny_t5(), args=TrainingArguments(**kw),
                          train_dataset=seq2seq_data(), callbacks=list(callbacks))
        DropGradCallback(drop_rate=0.3, seed=seed).attach(trainer)
        return trainer

    make(1, callbacks=[StopAt(2)]).train()
    resumed = make(5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert get_dropgrad(resumed).seed == 5
    assert "DropGradCallback(seed=...) 1 -> 5" in transformers_logs.text

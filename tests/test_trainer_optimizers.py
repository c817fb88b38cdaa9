"""Every ``--optim`` the plain Trainer runs on this CPU machine, under DropGrad.

For each name (its package installed: the ``optim`` extra): rate 0 is bit-identical to
``Trainer`` through ``DropGradTrainer`` and through ``DropGradCallback`` (schedule-free
optimizers: in eval mode too); at rate 0.5 with full update drop the gradient the updating
optimizer reads (its ``step()``, each per-parameter optimizer of a layer-wise one, LOMO's
hooks) is exactly the raw gradient masked by the stream's mask of ``(seed, step, position)``,
and every dropped element is bit-identical after each step. Four Trainer runs per name (five
for those that update inside ``backward()``); the masking without full update drop is the
same call for every optimizer, checked in tests/test_optimizer.py and tests/test_optim_db.py.
The names that cannot run here are listed, with the reason, in ``NOT_ON_THIS_MACHINE`` and in
the README.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

from hf_dropgrad import DropGradCallback, DropGradTrainer, get_dropgrad  # noqa: E402
from hf_dropgrad.in_backward import InBackward  # noqa: E402
from tests.optimizer_spy import SourceSpy  # noqa: E402
from tests.trainer_helpers import classification_data, common, tiny_bert_classifier  # noqa: E402

pytestmark = pytest.mark.slow

#: The package each name needs (the ``optim`` extra of pyproject.toml installs them).
PACKAGE = {
    "adamw_torch_4bit": "torchao",
    "adamw_torch_8bit": "torchao",
    "grokadamw": "grokadamw",
    "lomo": "lomo_optim",
    "stable_adamw": "optimi",
    **{n: "bitsandbytes" for n in (
        "adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit",
        "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit",
        "paged_lion_32bit", "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_8bit",
        "rmsprop_bnb_32bit",
    )},
    **{n: "galore_torch" for n in ("galore_adamw", "galore_adafactor", "galore_adamw_layerwise")},
    **{n: "apollo_torch" for n in ("apollo_adamw", "apollo_adamw_layerwise")},
    **{n: "schedulefree" for n in (
        "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
    )},
}

#: The names the plain Trainer cannot run on this CPU machine, and why (also in the README).
NOT_ON_THIS_MACHINE = {
    "adamw_torch_xla": "needs torch_xla (TPU)",
    "adamw_torch_npu_fused": "needs torch_npu (Ascend NPU)",
    "adamw_anyprecision": "needs torchdistx, which has no wheel on PyPI",
    "galore_adamw_8bit": "GaLore's 8-bit AdamW (bitsandbytes) needs CUDA",
    "galore_adamw_8bit_layerwise": "GaLore's 8-bit AdamW (bitsandbytes) needs CUDA",
    "galore_adafactor_layerwise": "the plain Trainer fails: transformers gives each "
    "per-parameter Adafactor an lr with relative_step=True (ValueError)",
    "adalomo": "AdaLomo allocates its state with .cuda() (tested here with .cuda() patched "
    "to stay on the CPU)",
}

ON_THIS_MACHINE = [o.value for o in OptimizerNames if o.value not in NOT_ON_THIS_MACHINE]
#: Schedule-free RAdam makes no update in its first steps (its warm-up): train long enough.
STEPS = {"schedule_free_radam": 6}


def test_every_optimizer_name_is_tested_or_listed_with_its_reason() -> None:
    names = {o.value for o in OptimizerNames}
    assert set(NOT_ON_THIS_MACHINE) <= names
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in NOT_ON_THIS_MACHINE:
        assert re.search(rf"`{name}`", readme), f"README does not list {name}"


def _args(tmp_path: Path, name: str, steps: int) -> dict:
    kw = common(tmp_path, max_steps=steps, optim=name)
    if "galore" in name or "apollo" in name:
        kw["optim_target_modules"] = ["attention", "intermediate", "output"]
    return kw


def _train(tmp_path: Path, name: str, how: str, steps: int, rate: float = 0.0,
           full_update_drop: bool = False, spy: TrainerCallback | None = None):
    model = tiny_bert_classifier()
    args = TrainingArguments(**_args(tmp_path / how, name, steps))
    data = classification_data()
    if how == "trainer":
        trainer = DropGradTrainer(model=model, args=args, train_dataset=data, dropgrad_rate=rate,
                                  dropgrad_full_update_drop=full_update_drop)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        if how == "callback":
            DropGradCallback(drop_rate=rate, full_update_drop=full_update_drop).attach(trainer)
    if spy is not None:
        trainer.add_callback(spy)
    trainer.train()
    return trainer


def _params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ON_THIS_MACHINE)
def test_optimizer_under_dropgrad(tmp_path, name: str) -> None:
    package = PACKAGE.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[optim]')")
    steps = STEPS.get(name, 3)
    plain = _train(tmp_path, name, "plain", steps)
    reference = _params(plain)
    eval_mode = callable(getattr(plain.optimizer.optimizer, "eval", None))
    if eval_mode:  # schedule-free: the parameters to evaluate are another point
        plain.optimizer.eval()
        reference_eval = _params(plain)
        assert not _same(reference, reference_eval)
    # rate 0: bit-identical to Trainer, both ways of adding DropGrad
    for how in ("trainer", "callback"):
        trainer = _train(tmp_path, name, how, steps)
        assert get_dropgrad(trainer) is not None
        assert _same(_params(trainer), reference), how
        if eval_mode:
            trainer.optimizer.eval()
            assert _same(_params(trainer), reference_eval), how
    # rate 0.5 with full update drop: the masks reach the optimizer that updates, exactly, and
    # the dropped elements stay put (through DropGradTrainer; an optimizer that updates inside
    # backward(), served by other code, through the callback too, without full update drop)
    spy = SourceSpy()
    trainer = _train(tmp_path, name, "trainer", steps, rate=0.5, full_update_drop=True, spy=spy)
    spy.check_masks(0.5, steps)
    spy.check_frozen(0.5)
    dropgrad = get_dropgrad(trainer)
    assert dropgrad.step_count == steps
    logged = [e["dropgrad_rate"] for e in trainer.state.log_history if "loss" in e]
    assert logged and set(logged) == {0.5}
    if eval_mode:  # train()/eval() reach the inner optimizer through DropGrad
        trainer.optimizer.eval()
        assert not dropgrad.optimizer.param_groups[0]["train_mode"]
    if dropgrad.in_backward:
        spy = SourceSpy()
        _train(tmp_path, name, "callback", steps, rate=0.5, spy=spy)
        spy.check_masks(0.5, steps)


@pytest.mark.parametrize("kind", ["galore_adamw", "apollo_adamw"])
def test_layerwise_masks_are_keyed_by_the_positions_of_the_plain_optimizer(tmp_path, kind):
    pytest.importorskip(PACKAGE[kind])
    names = {}
    for name in (kind, f"{kind}_layerwise"):
        trainer = _train(tmp_path / name, name, "trainer", 1, rate=0.1)
        dropgrad = get_dropgrad(trainer)
        names[name] = list(dropgrad.current_rates())
        assert isinstance(dropgrad.optimizer, InBackward) == name.endswith("_layerwise")
    assert names[kind] == names[f"{kind}_layerwise"]
    assert len(names[kind]) == len(list(tiny_bert_classifier().parameters()))


def test_layerwise_rate_table_logs_and_resume(tmp_path, transformers_logs) -> None:
    pytest.importorskip("galore_torch")
    name = "galore_adamw_layerwise"
    kw = _args(tmp_path, name, 4)
    kw.update(save_strategy="steps", save_steps=2, logging_steps=1)
    model = tiny_bert_classifier()
    spy = SourceSpy()
    full = DropGradTrainer(model=model, args=TrainingArguments(**kw),
                           train_dataset=classification_data(), dropgrad_rate=0.5)
    full.add_callback(spy)
    full.train()
    assert "bert.embeddings.word_embeddings.weight" in transformers_logs.text  # the rate table
    assert [e["dropgrad_rate"] for e in full.state.log_history if "loss" in e] == [0.5] * 4
    # resumed at step 2, the masks of steps 2 and 3 are those of the uninterrupted run (the
    # per-parameter optimizers' states are not in transformers' checkpoint, with or without
    # DropGrad, so the gradients differ: the masks are checked against their keys)
    resumed_spy = SourceSpy()
    resumed = DropGradTrainer(model=tiny_bert_classifier(), args=TrainingArguments(**kw),
                              train_dataset=classification_data(), dropgrad_rate=0.5)
    resumed.add_callback(resumed_spy)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    spy.check_masks(0.5, 4)
    resumed_spy.check_masks(0.5, range(2, 4))  # the keys follow the Trainer's global step
    assert get_dropgrad(resumed).step_count == 4


class _CudaStaysOnCpu:
    """AdaLomo allocates its state with ``.cuda()``; on this CPU machine it stays on the CPU."""

    def __enter__(self):
        self._cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        return self

    def __exit__(self, *exc):
        torch.Tensor.cuda = self._cuda


def test_adalomo_with_its_cuda_state_kept_on_the_cpu(tmp_path) -> None:
    pytest.importorskip("lomo_optim")
    with _CudaStaysOnCpu():
        reference = _params(_train(tmp_path, "adalomo", "plain", 3))
        for how in ("trainer", "callback"):
            assert _same(_params(_train(tmp_path, "adalomo", how, 3)), reference), how
        spy = SourceSpy()
        _train(tmp_path, "adalomo", "callback", 3, rate=0.5, full_update_drop=True, spy=spy)
    spy.check_masks(0.5, 3)
    spy.check_frozen(0.5)


def test_lomo_with_gradient_accumulation_is_refused_before_any_hook(tmp_path) -> None:
    pytest.importorskip("lomo_optim")
    kw = _args(tmp_path, "lomo", 2)
    kw["gradient_accumulation_steps"] = 2
    model = tiny_bert_classifier()
    trainer = DropGradTrainer(model=model, args=TrainingArguments(**kw),
                              train_dataset=classification_data(), dropgrad_rate=0.5)
    with pytest.raises(ValueError, match=r"--optim lomo \(Lomo\).*gradient_accumulation_steps"):
        trainer.train()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


class _Stand_in(torch.optim.SGD):
    """An optimizer whose step() trains nothing of the model: the updates happen in hooks."""


def test_an_optimizer_that_holds_none_of_the_model_parameters_is_refused(tmp_path) -> None:
    model = tiny_bert_classifier()
    stand_in = _Stand_in([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    trainer = DropGradTrainer(model=model, args=TrainingArguments(**common(tmp_path, max_steps=2)),
                              train_dataset=classification_data(), dropgrad_rate=0.5,
                              optimizers=(stand_in, None))
    with pytest.raises(ValueError, match=r"_Stand_in\) holds none of the model's trainable"):
        trainer.train()


def test_gradients_consumed_before_the_step_are_an_error_at_the_first_step(tmp_path) -> None:
    model = tiny_bert_classifier()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)

    def update_in_backward(p: torch.Tensor) -> None:  # an unknown optimizer that steps in hooks
        with torch.no_grad():
            p.add_(p.grad, alpha=-0.1)
        p.grad = None

    for p in params:
        p.register_post_accumulate_grad_hook(update_in_backward)
    trainer = Trainer(model=model, args=TrainingArguments(**common(tmp_path, max_steps=2)),
                      train_dataset=classification_data(), optimizers=(opt, None))
    DropGradCallback(drop_rate=0.5).attach(trainer)
    with pytest.raises(RuntimeError, match="no gradient on any parameter it masks"):
        trainer.train()
    assert trainer.state.global_step == 0

"""Installing DropGrad into an optimizer chain (hf_dropgrad/install.py): one entry point."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_dropgrad import DropGrad
from hf_dropgrad.install import install_dropgrad
from hf_dropgrad.integrations import deepspeed as deepspeed_integration
from hf_dropgrad.layout import FlatLayout
from tests.test_integrations_deepspeed import fake_zero12


def _build(**kwargs):
    calls = []

    def build(optimizer: torch.optim.Optimizer) -> DropGrad:
        calls.append(optimizer)
        return DropGrad(optimizer, **kwargs)

    return build, calls


@pytest.fixture
def layouts(monkeypatch) -> list[object]:
    """Every ZeRO optimizer a DropGrad's layout was attached to, once per attachment."""
    made: list[object] = []
    original = deepspeed_integration.attach_layout

    def counting(zero, dropgrad):
        made.append(zero)
        return original(zero, dropgrad)

    monkeypatch.setattr(deepspeed_integration, "attach_layout", counting)
    return made


def test_a_bare_optimizer_is_wrapped_and_a_dropgrad_kept() -> None:
    model = torch.nn.Linear(3, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    build, calls = _build(drop_rate=0.1)
    installed = install_dropgrad(inner, build)
    assert calls == [inner] and installed.dropgrad.optimizer is inner
    assert (installed.built, installed.engine_steps) == (True, False)
    again = install_dropgrad(installed.dropgrad, build)  # DropGradTrainer built it earlier
    assert again.dropgrad is installed.dropgrad and not again.built and calls == [inner]


def test_the_innermost_optimizer_of_a_chain_is_swapped() -> None:
    model = torch.nn.Linear(3, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    middle = SimpleNamespace(optimizer=inner)
    outer = SimpleNamespace(optimizer=middle)
    build, _ = _build(drop_rate=0.1)
    installed = install_dropgrad(outer, build)
    assert outer.optimizer is middle and middle.optimizer is installed.dropgrad
    assert installed.dropgrad.optimizer is inner
    assert install_dropgrad(outer, build).dropgrad is installed.dropgrad


def test_under_zero_the_client_is_wrapped_and_the_layout_attached_once(layouts) -> None:
    """A DeepSpeed `optimizer` block, or DropGradCallback on a plain Trainer: ZeRO built the
    optimizer; DropGrad goes in under ZeRO, and its partitions are mapped, once."""
    zero, dropgrad = fake_zero12(0, 2)
    zero.optimizer = dropgrad.optimizer  # DeepSpeed's own optimizer, no DropGrad yet
    engine = SimpleNamespace(optimizer=zero)  # what the Trainer holds
    build, calls = _build(drop_rate=0.5, seed=3)
    installed = install_dropgrad(engine, build)
    assert len(calls) == 1 and zero.optimizer is installed.dropgrad
    assert (installed.built, installed.engine_steps) == (True, True)
    assert isinstance(installed.dropgrad.layout, FlatLayout)
    assert layouts == [zero]


def test_a_dropgrad_zero_steps_is_attached_when_the_engine_exists(layouts) -> None:
    """DropGradTrainer: built on the bare optimizer (nothing to attach), attached once at the
    start of training, when ZeRO holds it."""
    zero, dropgrad = fake_zero12(0, 2)
    installed = install_dropgrad(SimpleNamespace(optimizer=zero), _build()[0])
    assert installed.dropgrad is dropgrad and not installed.built and installed.engine_steps
    assert layouts == [zero] and isinstance(dropgrad.layout, FlatLayout)


def test_a_deepspeed_optimizer_without_zero_is_refused() -> None:
    DeepSpeedOptimizer = type("FP16_Optimizer", (), {"__module__": "deepspeed.runtime.fp16"})
    holder = DeepSpeedOptimizer()
    holder.optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    build, calls = _build(drop_rate=0.1)
    with pytest.raises(ValueError, match="does not support DeepSpeed's FP16_Optimizer"):
        install_dropgrad(holder, build)
    assert calls == []


def test_installing_into_an_accelerated_optimizer_with_a_grad_scaler_keeps_masking() -> None:
    """The callback path swaps DropGrad in after prepare: under fp16 Accelerate's captured
    step method must be re-captured, or GradScaler would step the bare optimizer."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    model = torch.nn.Linear(64, 64)
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    accelerated = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    dropgrad = install_dropgrad(accelerated, _build(drop_rate=0.5, seed=0)[0]).dropgrad
    assert accelerated.optimizer is dropgrad and dropgrad.optimizer is inner
    scaler.scale(model(torch.ones(2, 64)).sum()).backward()
    accelerated.step()
    assert dropgrad.step_count == 1 and not accelerated.step_was_skipped
    frac = (model.weight.grad == 0).float().mean().item()
    assert 0.4 < frac < 0.6  # the masks were applied
    model.weight.grad[0, 0] = float("inf")
    accelerated.step()
    assert accelerated.step_was_skipped and dropgrad.step_count == 1

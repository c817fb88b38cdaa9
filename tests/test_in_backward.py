"""Optimizers that update inside ``backward()``: ``DropGrad(InBackward(...))`` and its hooks."""

from __future__ import annotations

import pickle

import pytest
import torch

from hf_dropgrad import DropGrad, get_dropgrad
from hf_dropgrad import functional as F
from hf_dropgrad.in_backward import InBackward, mark_served
from tests.helpers import backward, tiny_mlp

SEED = 3


def _adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1, foreach=False)


def _plain_run(rates, full_update_drop: bool, steps: int = 3) -> list[torch.Tensor]:
    """DropGrad over one AdamW holding every parameter, stepped after backward()."""
    model = tiny_mlp()
    params = list(model.parameters())
    opt = DropGrad(_adamw(params), params=dict(zip(params, rates)), seed=SEED,
                   full_update_drop=full_update_drop)
    for step in range(steps):
        backward(model, step)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in params]


def _layerwise_run(rates, full_update_drop: bool, steps: int = 3) -> tuple[list, DropGrad]:
    """One AdamW per parameter, stepped in its post-accumulate-grad hook (the layer-wise
    recipe), inside dropgrad.parameter_step."""
    model = tiny_mlp()
    params = list(model.parameters())
    optimizers = {p: _adamw([p]) for p in params}
    dropgrad = DropGrad(InBackward(optimizers), params=dict(zip(params, rates)), seed=SEED,
                        full_update_drop=full_update_drop)

    def hook(p: torch.Tensor) -> None:
        with dropgrad.parameter_step(p):
            optimizers[p].step()
        optimizers[p].zero_grad()

    for p in params:
        p.register_post_accumulate_grad_hook(hook)
    for step in range(steps):
        backward(model, step)  # every parameter steps in here
        assert all(p.grad is None for p in params)
        dropgrad.step()
    return [p.detach().clone() for p in params], dropgrad


@pytest.mark.parametrize("full_update_drop", [False, True], ids=["mask", "full_update_drop"])
def test_parameter_step_in_hooks_is_bit_identical_to_a_plain_run(full_update_drop) -> None:
    rates = [0.5, 0.0, 0.3, 0.7, 0.2, 1.0]
    got, dropgrad = _layerwise_run(rates, full_update_drop)
    assert dropgrad.step_count == 3
    want = _plain_run(rates, full_update_drop)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    unmasked = _plain_run([0.0] * 6, False)
    assert not torch.equal(got[0], unmasked[0])  # the masks applied


def test_register_mask_hooks_masks_each_gradient_as_backward_accumulates_it() -> None:
    model = tiny_mlp()
    params = list(model.parameters())
    backward(model, 0)
    raw = [p.grad.clone() for p in params]
    model.zero_grad()
    dropgrad = DropGrad(InBackward(torch.optim.SGD(params, lr=0.1)), drop_rate=0.4, seed=SEED,
                        full_update_drop=True)
    handles = dropgrad.register_mask_hooks()
    assert len(handles) == len(params)
    before = [p.detach().clone() for p in params]
    backward(model, 0)
    t = F.drop_threshold(0.4)
    for index, (p, g) in enumerate(zip(params, raw)):
        want = g.clone()
        F.mask_reference_(want, F.derive_key(SEED, 0, index), t, F.keep_scale(t))
        assert torch.equal(p.grad, want), index
    with torch.no_grad():  # an update made inside backward() (as LOMO's), from these gradients
        for p in params:
            p.add_(p.grad, alpha=-0.1).mul_(0.9)
    dropgrad.step()  # full update drop: the dropped elements are put back
    for index, (p, b) in enumerate(zip(params, before)):
        keep = F.keep_mask_reference(p.numel(), F.derive_key(SEED, 0, index), t).view_as(p)
        assert torch.equal(p.detach()[~keep], b[~keep]), index
        assert (p.detach()[keep] != b[keep]).all(), index
    assert dropgrad.step_count == 1


def test_a_step_with_no_masking_is_an_error_not_a_silent_no_op() -> None:
    model = tiny_mlp()
    optimizers = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}
    dropgrad = DropGrad(InBackward(optimizers), drop_rate=0.5)

    def hook(p: torch.Tensor) -> None:  # forgets dropgrad.parameter_step
        optimizers[p].step()
        optimizers[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    backward(model, 0)
    with pytest.raises(RuntimeError, match="no gradient was masked"):
        dropgrad.step()
    # at rate 0 there is nothing to mask, so nothing to check
    DropGrad(InBackward(optimizers), drop_rate=0.0).step()


def test_mask_parameter_is_for_in_backward_optimizers_and_their_parameters() -> None:
    model = tiny_mlp()
    plain = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5)
    assert not plain.in_backward
    with pytest.raises(RuntimeError, match=r"DropGrad\(InBackward"):
        plain.mask_parameter(next(model.parameters()))
    hooked = DropGrad(InBackward(torch.optim.SGD(model.parameters(), lr=0.1)), drop_rate=0.5)
    assert hooked.in_backward
    with pytest.raises(ValueError, match="not a parameter"):
        hooked.mask_parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="set_layout"):
        from hf_dropgrad.layout import FlatLayout

        hooked.set_layout(FlatLayout({}))


class _FusedBackward(torch.optim.SGD):
    def fused_backward(self, loss, lr):  # the LOMO interface
        loss.backward()


class _Dummy(torch.optim.SGD):
    def __init__(self, optimizer_dict):
        super().__init__([torch.zeros(1)], lr=1.0)
        self.optimizer_dict = optimizer_dict


def test_optimizers_that_bypass_step_are_refused_with_what_to_do() -> None:
    model = tiny_mlp()
    with pytest.raises(TypeError, match=r"fused_backward.*register_mask_hooks"):
        DropGrad(_FusedBackward(model.parameters(), lr=0.1), drop_rate=0.1)
    table = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}
    with pytest.raises(TypeError, match=r"optimizer_dict.*parameter_step"):
        DropGrad(_Dummy(table), drop_rate=0.1)
    released = torch.optim.SGD(model.parameters(), lr=0.1)
    released.defaults["gradient_release"] = True
    with pytest.raises(TypeError, match="gradient_release"):
        DropGrad(released, drop_rate=0.1)
    # served from beside the chain: get_dropgrad finds it from the optimizer
    dummy = _Dummy(table)
    dropgrad = DropGrad(InBackward(table), drop_rate=0.1)
    mark_served(dummy, dropgrad)
    assert get_dropgrad(dummy) is dropgrad


def test_in_backward_shares_groups_and_round_trips_its_state() -> None:
    model = tiny_mlp()
    params = list(model.parameters())
    optimizers = [torch.optim.Adam([p], lr=0.1) for p in params]
    facade = InBackward(optimizers)
    assert [g["params"][0] for g in facade.param_groups] == params
    facade.param_groups[0]["lr"] = 0.5
    assert optimizers[0].param_groups[0]["lr"] == 0.5
    backward(model, 0)
    for o in optimizers:
        o.step()
    assert len(facade.state) == len(params)
    dropgrad = DropGrad(facade, drop_rate=0.2, model=model)
    assert list(dropgrad.current_rates()) == [n for n, _ in model.named_parameters()]
    state = dropgrad.state_dict()
    fresh = [torch.optim.Adam([p], lr=0.1) for p in params]
    DropGrad(InBackward(fresh), drop_rate=0.2).load_state_dict(state)
    key = params[0]
    assert torch.equal(fresh[0].state[key]["exp_avg"], optimizers[0].state[key]["exp_avg"])
    with pytest.raises(TypeError, match="add the group"):
        dropgrad.add_param_group({"params": [torch.zeros(2)]})
    assert pickle.loads(pickle.dumps(dropgrad)).in_backward

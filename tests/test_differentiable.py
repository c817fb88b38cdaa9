"""``differentiable=True``: the mask is part of the autograd graph (masked out of place)."""

from __future__ import annotations

import pytest
import torch

from hf_dropgrad import DropGrad
from hf_dropgrad import functional as F

RATE, SEED = 0.3, 0


def _factor(numel: int, step: int, index: int, dtype=torch.float64) -> torch.Tensor:
    """The explicit mask times scale (what the derivative must carry)."""
    t = F.drop_threshold(RATE)
    keep = F.keep_mask_reference(numel, F.derive_key(SEED, step, index), t)
    return keep.to(dtype) * F.keep_scale(t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_masked_is_mask_of_a_copy_and_its_derivative_is_the_factor(dtype) -> None:
    g = torch.randn(5, 700, dtype=torch.float64).to(dtype).requires_grad_()
    t = F.drop_threshold(RATE)
    key = F.derive_key(SEED, 3, 1)
    out = F.masked(g, key, t, F.keep_scale(t))
    want = g.detach().clone()
    F.mask_([want], [key], [t], [F.keep_scale(t)])
    assert out.dtype == dtype and torch.equal(out, want)
    (d,) = torch.autograd.grad(out.sum(), g)
    factor = F.keep_factor(g, key, t, F.keep_scale(t))
    assert torch.equal(d, factor.to(dtype))
    assert torch.equal(factor != 0, F.keep_mask_reference(g.numel(), key, t).view_as(g))


def test_the_issue_reproduction_carries_mask_and_scale() -> None:
    torch.manual_seed(0)
    H = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 4, dtype=torch.float64, requires_grad=True).clone()
    p.grad = graph_grad = H * 2.0
    kept_values = graph_grad.detach().clone()
    opt = DropGrad(torch.optim.SGD([p], lr=0.1, differentiable=True), drop_rate=RATE, seed=SEED)
    opt.step()
    (d,) = torch.autograd.grad(p.sum(), H)
    assert torch.equal(d, -0.2 * _factor(12, 0, 0).view(3, 4))
    # the caller's graph tensor is not overwritten
    assert p.grad is not graph_grad and torch.equal(graph_grad, kept_values)


def _two_steps(make, differentiable: bool, full_update_drop: bool, explicit: bool,
               graph_grad: bool = True):
    """Two steps of ``make([p], differentiable=...)`` on gradients H * 2 and H * 3 (detached
    unless ``graph_grad``); with ``explicit`` the bare optimizer gets gradients masked by hand
    (the reference)."""
    torch.manual_seed(1)
    H = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64)
    p = torch.randn(4, 5, dtype=torch.float64, requires_grad=differentiable)
    if differentiable:
        p = p.clone()  # a graph tensor: what a differentiable optimizer steps
    inner = make([p], differentiable=differentiable)
    opt = inner if explicit else DropGrad(inner, drop_rate=RATE, seed=SEED,
                                          full_update_drop=full_update_drop)
    for step, k in enumerate((2.0, 3.0)):
        grad = H * k if differentiable and graph_grad else (H * k).detach()
        factor = _factor(20, step, 0).view(4, 5)
        before = p.clone()
        p.grad = grad * factor if explicit else grad
        opt.step()
        if explicit and full_update_drop:
            with torch.set_grad_enabled(differentiable):
                p.copy_(torch.where(factor != 0, p, before))
    value = p.detach().clone()
    d = torch.autograd.grad((p * w).sum(), H)[0] if differentiable and graph_grad else None
    return value, d


OPTIMIZERS = {
    "sgd_momentum_wd": lambda ps, **kw: torch.optim.SGD(ps, lr=0.1, momentum=0.9,
                                                        weight_decay=0.1, **kw),
    "adam": lambda ps, **kw: torch.optim.Adam(ps, lr=0.01, **kw),
    "rmsprop": lambda ps, **kw: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, **kw),
}


@pytest.mark.parametrize("full_update_drop", [False, True], ids=["mask", "full_update_drop"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_derivatives_match_an_explicit_mask_and_values_stay_those_of_in_place_masking(
    name: str, full_update_drop: bool
) -> None:
    make = OPTIMIZERS[name]
    value, d = _two_steps(make, True, full_update_drop, explicit=False)
    ref_value, ref_d = _two_steps(make, True, full_update_drop, explicit=True)
    assert torch.equal(value, ref_value)
    # bit for bit, NaN where both are (Adam: the derivative of sqrt(v) at v = 0)
    torch.testing.assert_close(d, ref_d, rtol=0, atol=0, equal_nan=True)
    # the values are those of in-place masking (the same optimizer, a gradient that requires
    # no grad)
    plain_value, _ = _two_steps(make, True, full_update_drop, explicit=False, graph_grad=False)
    assert torch.equal(value, plain_value)
    if full_update_drop:  # the first step's dropped elements got no derivative from it
        assert (d != 0).any()


def test_full_update_drop_freezes_a_graph_parameter_and_its_derivative() -> None:
    H = torch.randn(6, dtype=torch.float64, requires_grad=True)
    p = torch.zeros(6, dtype=torch.float64)  # not a graph tensor until the step
    p.grad = H * 1.0
    opt = DropGrad(torch.optim.SGD([p], lr=1.0, differentiable=True, weight_decay=0.5),
                   drop_rate=0.5, seed=SEED, full_update_drop=True)
    opt.step()
    t = F.drop_threshold(0.5)
    keep = F.keep_mask_reference(6, F.derive_key(SEED, 0, 0), t)
    assert torch.equal(p[~keep].detach(), torch.zeros(int((~keep).sum()), dtype=torch.float64))
    (d,) = torch.autograd.grad(p.sum(), H)
    assert torch.equal(d, torch.where(keep, -F.keep_scale(t), 0.0).to(torch.float64))

"""torch's own optimizer test database (``optim_db``: 15 optimizers) under DropGrad.

Every sample (``optim_inputs_func`` on the CPU, float32 and float64, each implementation torch
lists for it: the default, ``foreach``, ``fused`` where it runs on the CPU, ``differentiable``)
is checked three ways: at rate 0 three steps are bit-identical to the bare optimizer; at rate
0.3 the gradient its ``step()`` reads is exactly the raw gradient masked by the stream's mask of
``(seed, step, position)``, and the parameters are bit-identical to the bare optimizer's stepped
on gradients masked by hand (LBFGS: a closure that masks by hand); with ``differentiable=True``
the derivative of the stepped parameters with respect to the gradients equals the one through
an explicit mask, and the values those of in-place masking. Sparse gradients (SparseAdam, and
the sparse samples of Adagrad and SGD) pass through at rate 0 and are a clear error at 0.3.
"""

from __future__ import annotations

import pytest
import torch

from hf_dropgrad import DropGrad
from hf_dropgrad import functional as F

optimizers_db = pytest.importorskip(
    "torch.testing._internal.common_optimizers", reason="needs expecttest (the dev extra)"
)

pytestmark = pytest.mark.slow

RATE, SEED, STEPS = 0.3, 11, 3
T = F.drop_threshold(RATE)
DB = {info.optim_cls.__name__: info for info in optimizers_db.optim_db}


def _samples(info, dtype: torch.dtype) -> list[tuple[str, dict]]:
    """``(description, kwargs)`` of every sample and implementation torch lists for the CPU."""
    out = []
    for sample in info.optim_inputs_func(device="cpu", dtype=dtype):
        out.append((sample.desc, dict(sample.kwargs)))
        for impl in info.supported_impls:
            if impl == "fused" and "cpu" not in info.supports_fused_on:
                continue
            out.append((f"{sample.desc}, {impl}", {**sample.kwargs, impl: True}))
    return out


def _params(name: str, dtype: torch.dtype, graph: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (3, 5)] if name == "Muon" else [(5, 4), (5,)]  # Muon: matrices only
    params = [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]
    return [p.clone() for p in params] if graph else params


def _loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return sum(((p - torch.randn(p.shape, generator=g, dtype=p.dtype)) ** 2 * (i + 1)).sum()
               for i, p in enumerate(params))


def _mask_by_hand(params: list[torch.Tensor], step: int) -> None:
    for index, p in enumerate(params):
        F.mask_reference_(p.grad, F.derive_key(SEED, step, index), T, F.keep_scale(T))


def _run(info, kwargs: dict, dtype, *, wrap: float | None, by_hand: bool = False,
         sparse: bool = False, spy: list | None = None) -> list[torch.Tensor]:
    """``STEPS`` steps of ``info``'s optimizer (wrapped in DropGrad at rate ``wrap``)."""
    name = info.optim_cls.__name__
    # differentiable=True steps graph tensors (non-leaf): what meta-learning differentiates
    params = _params(name, dtype, graph=bool(kwargs.get("differentiable")))
    inner = info.optim_cls(params, **kwargs)
    opt = inner if wrap is None else DropGrad(inner, drop_rate=wrap, seed=SEED)
    if spy is not None:
        raw: list[torch.Tensor] = []
        opt.register_step_pre_hook(lambda *_: raw.__setitem__(
            slice(None), [p.grad.clone() for p in params]))
        inner.register_step_pre_hook(lambda *_: spy.append(
            (opt.step_count, list(raw), [p.grad.clone() for p in params])))
    for step in range(STEPS):
        def closure(step: int = step) -> torch.Tensor:
            loss = _loss(params, step)
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g.to_sparse() if sparse else g
            if by_hand:
                _mask_by_hand(params, step)
            return loss

        if info.step_requires_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
    return [p.detach().clone() for p in params]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _differentiable(info, kwargs: dict, dtype, explicit: bool, graph_grad: bool = True):
    """A step on gradients that are functions of ``H`` (graph tensors); ``explicit``: the bare
    optimizer on gradients masked by an explicit factor. Returns values and d/dH. (One step:
    some optimizers update state in place that an earlier step's graph still needs.)"""
    name = info.optim_cls.__name__
    params = _params(name, dtype, graph=True)
    g = torch.Generator().manual_seed(5)
    H = [torch.randn(p.shape, generator=g, dtype=dtype, requires_grad=True) for p in params]
    inner = info.optim_cls(params, **kwargs)
    opt = inner if explicit else DropGrad(inner, drop_rate=RATE, seed=SEED)
    for index, (p, h) in enumerate(zip(params, H)):
        grad = h * 2.0 if graph_grad else (h * 2.0).detach()
        if explicit:
            grad = grad * F.keep_factor(grad, F.derive_key(SEED, 0, index), T, F.keep_scale(T))
        p.grad = grad
    opt.step()
    values = [p.detach().clone() for p in params]
    if not graph_grad:
        return values, None
    w = torch.Generator().manual_seed(6)
    out = sum((p * torch.randn(p.shape, generator=w, dtype=dtype)).sum() for p in params)
    return values, torch.autograd.grad(out, H, allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(DB))
def test_optim_db(name: str, dtype: torch.dtype) -> None:
    info = DB[name]
    checked = 0
    for desc, kwargs in _samples(info, dtype):
        sparse = info.only_supports_sparse_grads
        try:
            bare = _run(info, kwargs, dtype, wrap=None, sparse=sparse)
        except Exception as error:  # a combination torch itself refuses here
            with pytest.raises(type(error)):
                _run(info, kwargs, dtype, wrap=0.0, sparse=sparse)
            continue
        assert _same(_run(info, kwargs, dtype, wrap=0.0, sparse=sparse), bare), desc
        if sparse:
            with pytest.raises(RuntimeError, match="sparse gradients"):
                _run(info, kwargs, dtype, wrap=RATE, sparse=True)
            checked += 1
            continue
        spy: list = []  # LBFGS reads the closure's gradients: checked by the by-hand run
        masked = _run(info, kwargs, dtype, wrap=RATE,
                      spy=None if info.step_requires_closure else spy)
        assert _same(masked, _run(info, kwargs, dtype, wrap=None, by_hand=True)), desc
        assert not _same(masked, bare), desc
        if not info.step_requires_closure:
            assert [step for step, _, _ in spy] == list(range(STEPS)), desc
            for step, raw, seen in spy:
                for index, (r, s) in enumerate(zip(raw, seen)):
                    want = r.clone()
                    F.mask_reference_(want, F.derive_key(SEED, step, index), T, F.keep_scale(T))
                    assert torch.equal(s, want), (desc, step, index)
        if kwargs.get("differentiable"):
            values, d = _differentiable(info, kwargs, dtype, explicit=False)
            ref_values, ref_d = _differentiable(info, kwargs, dtype, explicit=True)
            assert _same(values, ref_values), desc
            for a, b in zip(d, ref_d):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=desc)
            in_place, _ = _differentiable(info, kwargs, dtype, explicit=False, graph_grad=False)
            assert _same(values, in_place), desc
        checked += 1
    assert checked > 0
    if info.supports_sparse and dtype == torch.float64:  # Adagrad, SGD: sparse samples
        kwargs = dict(info.metadata_for_sparse[0])
        bare = _run(info, kwargs, dtype, wrap=None, sparse=True)
        assert _same(_run(info, kwargs, dtype, wrap=0.0, sparse=True), bare)
        with pytest.raises(RuntimeError, match="sparse gradients"):
            _run(info, kwargs, dtype, wrap=RATE, sparse=True)

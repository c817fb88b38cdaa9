"""DropGrad, the optimizer wrapper (hf_dropgrad/optimizer.py)."""

from __future__ import annotations

import io

import pytest
import torch

from hf_dropgrad import DropGrad, LinearDropRateScheduler, get_dropgrad
from hf_dropgrad import functional as F
from tests.helpers import backward, loss_of, reference_mask_, tiny_mlp


def _train(opt_factory, steps: int, seed: int = 0, start: int = 0, model=None):
    model = model or tiny_mlp(seed)
    opt = opt_factory(model)
    for k in range(start, start + steps):
        backward(model, k)
        opt.step()
        opt.zero_grad()
    return model, opt


def test_rate_zero_is_bit_identical_to_the_bare_optimizer() -> None:
    bare, _ = _train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), 5)
    wrapped, _ = _train(lambda m: DropGrad(torch.optim.AdamW(m.parameters(), lr=1e-2), 0.0), 5)
    for a, b in zip(bare.parameters(), wrapped.parameters()):
        assert torch.equal(a, b)


def test_step_masks_exactly_as_the_reference_then_steps() -> None:
    model = tiny_mlp()
    twin = tiny_mlp()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.3, seed=7)
    ref_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for k in range(3):
        backward(model, k)
        backward(twin, k)
        params = list(twin.parameters())
        reference_mask_(params, [0.3] * len(params), seed=7, step=k)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_masks_ignore_the_global_rng() -> None:
    def run(noise: int) -> list[torch.Tensor]:
        model = tiny_mlp()
        opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=3)
        for k in range(3):
            torch.manual_seed(noise + k)  # what dropout layers or data loaders would do
            torch.rand(100)
            backward(model, k)
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(0), run(12345)):
        assert torch.equal(a, b)


def test_seed_defaults_to_torch_initial_seed() -> None:
    inner = torch.optim.SGD(tiny_mlp().parameters(), lr=0.1)
    torch.manual_seed(31)
    opt = DropGrad(inner, drop_rate=0.1)
    assert opt.seed == 31


def test_per_parameter_rates_and_current_rates() -> None:
    model = tiny_mlp()
    first, last = model[0].weight, model[4].bias
    opt = DropGrad(
        torch.optim.SGD(model.parameters(), lr=0.1), params={first: 0.5, last: 0.0}, seed=1
    )
    assert opt.current_rates() == {0: 0.5, 5: 0.0}
    backward(model, 0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt._mask(opt._targets())
    assert (model[0].weight.grad == 0).float().mean().item() == pytest.approx(0.5, abs=0.15)
    for name, p in model.named_parameters():
        if p is not first:
            assert torch.equal(p.grad, grads[name]), name


def test_current_rates_use_names_from_named_parameters() -> None:
    model = tiny_mlp()
    opt = DropGrad(torch.optim.AdamW(model.named_parameters(), lr=1e-3), drop_rate=0.2)
    assert opt.current_rates() == {n: 0.2 for n, _ in model.named_parameters()}
    opt2 = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-3), drop_rate=0.2, model=model)
    assert opt2.current_rates() == opt.current_rates()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"drop_rate": 1.5}, ValueError, r"drop_rate must be in \[0, 1\]"),
        ({"drop_rate": -0.1}, ValueError, "drop_rate"),
        ({"drop_rate": float("nan")}, ValueError, "drop_rate"),
        ({"drop_rate": "0.1"}, TypeError, "drop_rate must be a number"),
        ({"drop_rate": True}, TypeError, "drop_rate"),
        ({}, ValueError, "needs drop_rate"),
        ({"params": [0.1]}, TypeError, "params must be a mapping"),
        ({"params": {3: 0.1}}, TypeError, "params keys must be"),
        ({"params": {"0": 0.1}}, ValueError, "model="),
        ({"drop_rate": 0.1, "full_update_drop": 1}, TypeError, "full_update_drop"),
        ({"drop_rate": 0.1, "seed": 1.5}, TypeError, "seed"),
        ({"drop_rate": 0.1, "drop_rate_scheduler": 0.1}, TypeError, "drop_rate_scheduler"),
        (
            {"drop_rate": 0.1, "drop_rate_scheduler": LinearDropRateScheduler(0.2, 0.0, 10)},
            ValueError,
            "conflicts",
        ),
    ],
)
def test_bad_input_is_rejected_at_construction(kwargs, error, match) -> None:
    model = tiny_mlp()
    with pytest.raises(error, match=match):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_bad_parameter_keys_and_values() -> None:
    model, other = tiny_mlp(), tiny_mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of the wrapped optimizer"):
        DropGrad(opt, params={other[0].weight: 0.1})
    with pytest.raises(ValueError, match=r"params\[<parameter \(16, 8\)>\] must be in \[0, 1\]"):
        DropGrad(opt, params={model[0].weight: 2.0})
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer"):
        DropGrad(model, drop_rate=0.1)
    with pytest.raises(ValueError, match="already a DropGrad"):
        DropGrad(DropGrad(opt, drop_rate=0.1), drop_rate=0.1)
    with pytest.raises(ValueError, match="starts at 0"):
        DropGrad(
            opt,
            params={model[0].weight: 0.1},
            drop_rate_scheduler=LinearDropRateScheduler(0.0, 0.1, 10),
        )


def test_shares_param_groups_state_and_defaults() -> None:
    inner = torch.optim.AdamW(tiny_mlp().parameters(), lr=1e-3)
    opt = DropGrad(inner, drop_rate=0.1)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    assert opt.optimizer is inner and opt.drop_rate == 0.1
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5


def test_lr_schedulers_accept_it() -> None:
    from torch.optim.lr_scheduler import LambdaLR, StepLR

    model = tiny_mlp()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.1)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    for k in range(3):
        backward(model, k)
        opt.step()
        sched.step()
        opt.zero_grad()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)
    lam = LambdaLR(opt, lambda k: 0.1 * (k + 1))
    lam.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_transformers_schedule_accepts_it() -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny_mlp()
    opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-3), drop_rate=0.1)
    sched = transformers.get_linear_schedule_with_warmup(opt, 2, 10)
    backward(model, 0)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)


def test_step_hooks_run() -> None:
    model = tiny_mlp()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    backward(model, 0)
    opt.step()
    assert calls == ["pre", "post"]


def test_grad_scaler_skips_inf_steps_and_never_unscales_twice() -> None:
    model = tiny_mlp()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(loss_of(model, 0)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.unscale_(opt)  # as Trainer/Accelerate do before clipping
    scaler.step(opt)  # must not unscale again (that raises) and must skip
    scaler.update()
    assert scaler.get_scale() < 2.0**10
    assert opt.step_count == 0
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    # a finite step goes through and is masked: the inner optimizer gets the unscaled
    # gradients with this step's masks (GradScaler unscales before DropGrad masks)
    opt.zero_grad()
    x, y = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    unscaled: list[torch.Tensor] = []
    opt.register_step_pre_hook(
        lambda *_: unscaled.extend(p.grad.clone() for p in model.parameters())
    )
    stepped: list[torch.Tensor] = []
    opt.optimizer.register_step_pre_hook(
        lambda *_: stepped.extend(p.grad.clone() for p in model.parameters())
    )
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 1
    expected = [torch.nn.Parameter(torch.zeros_like(g)) for g in unscaled]
    for e, g in zip(expected, unscaled):
        e.grad = g.clone()
    reference_mask_(expected, [0.5] * len(expected), opt.seed, 0)
    assert len(stepped) == len(expected) > 0
    for e, got in zip(expected, stepped):
        assert torch.equal(got, e.grad)
    dropped = sum(int(((g == 0) & (b != 0)).sum()) for g, b in zip(stepped, unscaled))
    assert dropped > 0  # the mask really dropped elements


def test_accelerate_prepare_and_get_dropgrad() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = tiny_mlp()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = DropGrad(inner, drop_rate=0.2, seed=5)
    accelerator = accelerate.Accelerator(cpu=True)
    model, prepared = accelerator.prepare(model, opt)
    assert get_dropgrad(prepared) is opt
    assert get_dropgrad(inner) is None
    accelerator.backward(loss_of(model, 0))
    prepared.step()
    assert opt.step_count == 1 and not accelerator.optimizer_step_was_skipped


def test_zero_grad_add_param_group_and_train_eval() -> None:
    model = tiny_mlp()
    extra = torch.nn.Parameter(torch.ones(50))

    class WithModes(torch.optim.SGD):
        mode = "none"

        def train(self) -> None:
            self.mode = "train"

        def eval(self) -> None:
            self.mode = "eval"

    inner = WithModes(model.parameters(), lr=0.1)
    opt = DropGrad(inner, drop_rate=1.0)
    opt.add_param_group({"params": [extra]})
    assert len(opt.current_rates()) == 7
    extra.grad = torch.ones(50)
    opt.step()
    assert torch.equal(extra, torch.ones(50))  # p = 1: nothing moves
    opt.zero_grad(set_to_none=True)
    assert extra.grad is None
    opt.train()
    assert inner.mode == "train"
    opt.eval()
    assert inner.mode == "eval"
    DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1).train()  # no-op


def _fresh(model, sched: bool = False):
    return DropGrad(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        drop_rate=None if sched else 0.3,
        drop_rate_scheduler=LinearDropRateScheduler(0.4, 0.05, 8) if sched else None,
        seed=11,
    )


@pytest.mark.parametrize("sched", [False, True])
def test_save_load_continues_bit_identically(sched: bool) -> None:
    full, _ = _train(lambda m: _fresh(m, sched), 10)
    half, opt = _train(lambda m: _fresh(m, sched), 5)
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = tiny_mlp(seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = _fresh(resumed, sched)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.step_count == 5
    _train(lambda m: opt2, 5, start=5, model=resumed)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_loading_a_plain_inner_state_dict() -> None:
    model, inner_opt = _train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), 3)
    opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-2), drop_rate=0.1)
    opt.load_state_dict(inner_opt.state_dict())
    assert opt.step_count == 0
    assert len(opt.state) == len(inner_opt.state)


@pytest.mark.parametrize(
    "make_inner",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
        lambda ps: torch.optim.Adafactor(ps, lr=0.05, weight_decay=0.1),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
    ],
    ids=["sgd-momentum-wd", "adamw", "adafactor", "rmsprop"],
)
def test_full_update_drop_freezes_dropped_elements(make_inner) -> None:
    normal_model, frozen_model = tiny_mlp(), tiny_mlp()
    normal = DropGrad(make_inner(normal_model.parameters()), drop_rate=0.4, seed=2)
    frozen = DropGrad(
        make_inner(frozen_model.parameters()), drop_rate=0.4, seed=2, full_update_drop=True
    )
    for k in range(4):
        # momentum and weight decay would move dropped elements: they must not
        before = [p.detach().clone() for p in frozen_model.parameters()]
        backward(frozen_model, k)
        backward(normal_model, k)
        keeps = [
            F.keep_mask(p.numel(), F.derive_key(2, k, i), F.drop_threshold(0.4)).view_as(p)
            for i, p in enumerate(frozen_model.parameters())
        ]
        normal_before = [p.detach().clone() for p in normal_model.parameters()]
        frozen.step()
        frozen.zero_grad()
        normal.step()
        normal.zero_grad()
        for b, p, keep in zip(before, frozen_model.parameters(), keeps):
            assert torch.equal(p[~keep], b[~keep])
            if k == 0:
                assert not torch.equal(p[keep], b[keep])
        if k == 0:  # same start: kept elements got exactly the rescaled-gradient update
            for p, q, b in zip(frozen_model.parameters(), normal_model.parameters(), normal_before):
                keep = p != b
                assert torch.equal(p[keep], q[keep])


def _mixed_layout_model() -> torch.nn.Module:
    """tiny_mlp plus a non-contiguous (transposed) weight and a bf16 parameter."""
    model = tiny_mlp()
    model[2].weight = torch.nn.Parameter(model[2].weight.detach().t().contiguous().t())
    model.register_parameter("bf16", torch.nn.Parameter(torch.randn(50_000, dtype=torch.bfloat16)))
    assert not model[2].weight.is_contiguous()
    return model


def _train_full_update_drop(model: torch.nn.Module, steps: int) -> list[list[torch.Tensor]]:
    opt = DropGrad(
        torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1),
        drop_rate=0.3, seed=5, full_update_drop=True,
    )
    history = []
    for k in range(steps):
        backward(model, k)
        model.bf16.grad = torch.ones_like(model.bf16)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        for i, (b, p) in enumerate(zip(before, model.parameters())):
            keep = F.keep_mask(p.numel(), F.derive_key(5, k, i), F.drop_threshold(0.3))
            assert torch.equal(p.reshape(-1)[~keep], b.reshape(-1)[~keep])  # frozen
            assert not torch.equal(p.reshape(-1)[keep], b.reshape(-1)[keep])  # moved
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def test_full_update_drop_compiled_and_pure_torch_paths_agree(monkeypatch) -> None:
    """The kernel's packed save/restore equals the masked_select path, layouts mixed."""
    from hf_dropgrad.kernels import cpp

    if cpp.load() is None:
        pytest.skip("the C++ kernel cannot be built here")
    compiled = _train_full_update_drop(_mixed_layout_model(), 3)
    monkeypatch.setenv("HF_DROPGRAD_BACKEND", "torch")
    assert F.needs_mask_buffer(torch.zeros(3))
    pure = _train_full_update_drop(_mixed_layout_model(), 3)
    for a, b in zip(compiled, pure):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_save_dropped_keeps_only_the_dropped_values() -> None:
    x = torch.randn(300, 70)
    t = F.drop_threshold(0.25)
    saved = F.save_dropped(x, 42, t)
    keep = F.keep_mask(x.numel(), 42, t).view_as(x)
    assert torch.equal(saved._values, x[~keep])
    y = torch.zeros_like(x)
    F.save_dropped(y, 42, t)  # a different tensor, same stream
    saved_y = F.DroppedValues(y, 42, t, saved._values, saved._starts, backend=saved.backend)
    saved_y.restore()
    assert torch.equal(y, torch.where(keep, torch.zeros_like(x), x))


def test_closure_is_masked_each_time_it_is_evaluated() -> None:
    model = tiny_mlp()
    opt = DropGrad(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3), drop_rate=0.2)

    def closure():
        opt.zero_grad()
        return backward(model, 0)

    loss = opt.step(closure)
    assert torch.isfinite(loss) and opt.step_count == 1
    model2 = tiny_mlp()
    opt2 = DropGrad(torch.optim.SGD(model2.parameters(), lr=0.1), drop_rate=0.2, seed=opt.seed)
    twin = tiny_mlp()
    ref = torch.optim.SGD(twin.parameters(), lr=0.1)
    opt2.step(lambda: backward(model2, 0))
    backward(twin, 0)
    reference_mask_(list(twin.parameters()), [0.2] * 6, seed=opt.seed, step=0)
    ref.step()
    for a, b in zip(model2.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients(dtype: torch.dtype) -> None:
    model = tiny_mlp().to(dtype)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=4)
    x = torch.randn(6, 8, dtype=dtype)
    model(x).float().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    reference_mask_(list(model.parameters()), [0.5] * 6, seed=4, step=0)
    masked = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), expected):
        p.grad = g
    opt._mask(opt._targets())
    for p, m in zip(model.parameters(), masked):
        assert p.grad.dtype == dtype and torch.equal(p.grad, m)


def test_sparse_gradients_raise_a_clear_error() -> None:
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = DropGrad(torch.optim.SGD(emb.parameters(), lr=0.1), drop_rate=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_none_gradients_are_skipped() -> None:
    model = tiny_mlp()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    model[4].weight.grad = torch.ones(3, 16)  # the only gradient: position 4
    opt.step()
    assert opt.step_count == 1
    # the parameter with a gradient is masked with its own position's key...
    grad = model[4].weight.grad
    threshold = F.drop_threshold(0.5)
    keep = F.keep_mask(16 * 3, F.derive_key(2, 0, 4), threshold).view(3, 16)
    assert torch.equal(grad, torch.where(keep, F.keep_scale(threshold), 0.0))
    assert 0 < int(keep.sum()) < keep.numel()
    # ...and the others are left alone: no gradient made up, no parameter moved
    for index, (p, b) in enumerate(zip(model.parameters(), before)):
        if index != 4:
            assert p.grad is None and torch.equal(p.detach(), b), index


def test_get_dropgrad_walks_wrapper_chains() -> None:
    opt = DropGrad(torch.optim.SGD(tiny_mlp().parameters(), lr=0.1), drop_rate=0.1)

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert get_dropgrad(Wrapper(Wrapper(opt))) is opt
    assert get_dropgrad(opt) is opt
    assert get_dropgrad(object()) is None
    assert get_dropgrad(None) is None


def test_drop_in_for_the_dropgrad_package_usage() -> None:
    model = tiny_mlp()
    params = list(model.parameters())
    # dropgrad's README: DropGrad(opt, drop_rate=...), .optimizer, per-parameter rates
    opt = DropGrad(torch.optim.Adam(params, lr=1e-3), drop_rate=0.1)
    assert isinstance(opt.optimizer, torch.optim.Adam) and opt.drop_rate == 0.1
    opt.drop_rate = 0.2
    assert opt.current_rates()[0] == 0.2
    opt = DropGrad(torch.optim.Adam(params, lr=1e-3), params={params[0]: 0.1, params[1]: 0.2})
    assert opt.current_rates() == {0: 0.1, 1: 0.2}
    sched = LinearDropRateScheduler(0.1, 0.0, 100)
    opt = DropGrad(torch.optim.Adam(params, lr=1e-3), drop_rate_scheduler=sched)
    assert sched.get_drop_rate() == 0.1 and opt.drop_rate == 0.1


def _tiny_t5():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg)


def test_readme_module_rates_example_runs_as_written() -> None:
    model = _tiny_t5()
    optimizer = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
    optimizer = DropGrad(optimizer, params={"encoder": 0.1, "decoder": 0.2})
    rates = optimizer.current_rates()
    # param_names hold each tensor once: the tied embedding is only "shared.weight", which
    # neither pattern names, so it is left alone (model= would let its aliases count).
    assert set(rates) == {n for n, _ in model.named_parameters()} - {"shared.weight"}
    for name, rate in rates.items():
        assert rate == (0.2 if name.startswith("decoder.") else 0.1), name
    with_model = DropGrad(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        params={"encoder": 0.1, "decoder": 0.2},
        model=model,
    )
    assert with_model.current_rates() == {**rates, "shared.weight": 0.1}
    ids = torch.randint(1, 64, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    dec = model.decoder.block[0].layer[0].SelfAttention.q.weight.grad
    enc = model.encoder.block[0].layer[0].SelfAttention.q.weight.grad
    assert 0.05 < (dec == 0).float().mean().item() and (enc == 0).float().mean().item() < 0.2


def test_patterns_with_model_reach_tied_aliases_and_explain_missing_names() -> None:
    model = _tiny_t5()
    opt = DropGrad(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        params={"decoder.embed_tokens": 0.3, model.lm_head.weight: 0.3},
        model=model,
    )
    assert opt.current_rates() == {"shared.weight": 0.3}
    assert "shared.weight" in opt.describe()
    with pytest.raises(ValueError, match="pass model=<your model>"):
        DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-3), params={"encoder": 0.1})
    with pytest.raises(ValueError, match="encodr") as info:
        DropGrad(
            torch.optim.AdamW(model.named_parameters(), lr=1e-3), params={"encodr": 0.1}
        )
    assert "encoder" in str(info.value)
    with pytest.raises(ValueError, match=r"params\['encoder'\] must be in \[0, 1\]"):
        DropGrad(torch.optim.AdamW(model.named_parameters(), lr=1e-3), params={"encoder": 3})


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_outside_the_stream_key_range_is_refused(seed: int) -> None:
    # One rule with --dropgrad_seed: an integer in [0, 2**64), the stream's key space.
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"seed.*\[0, 2\*\*64\)"):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1, seed=seed)
    DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1, seed=2**64 - 1)


def test_a_parameter_held_twice_is_refused_naming_both_positions() -> None:
    import warnings

    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch only warns about duplicates
        inner = torch.optim.SGD([p, q, p], lr=0.1)
    with pytest.raises(ValueError, match="same parameter twice, at positions 0 and 2"):
        DropGrad(inner, drop_rate=0.5)
    opt = DropGrad(torch.optim.SGD([p], lr=0.1), drop_rate=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="positions 1 and 2"):
            opt.add_param_group({"params": [q, q]})  # torch itself refuses p in two groups
    assert len(opt.param_groups) == 1 and opt.num_params == 1  # left as it was

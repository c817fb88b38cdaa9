"""Mixed precision and the step path (docs/design.md, "Invariants"): fp16 with a GradScaler,
bf16 gradients.

fp16 on the CPU: Accelerate 1.15 has no fp16 there (``Accelerator(mixed_precision="fp16",
cpu=True)`` makes no ``GradScaler`` and no autocast). The tests give it a CPU
``torch.amp.GradScaler`` before ``prepare`` (``accelerator.scaler`` / ``native_amp``), so
Accelerate's own fp16 code runs as on a GPU: fp16 autocast of the forward, ``unscale_gradients``
inside ``accelerator.clip_grad_norm_``, and ``AcceleratedOptimizer.step`` calling
``scaler.step`` / ``scaler.update`` and reporting skipped steps.
"""

from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from hf_dropgrad import DropGrad, get_dropgrad  # noqa: E402
from hf_dropgrad import functional as F  # noqa: E402
from tests.helpers import loss_of, tiny_mlp  # noqa: E402

SEED = 3
RATE = 0.5
INIT_SCALE = 2.0**8  # a power of two: unscaling is exact, so grads can be compared bit for bit


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator (its settings differ from the other tests')."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def fp16_accelerator(**kwargs) -> Accelerator:
    accelerator = Accelerator(cpu=True, mixed_precision="fp16", **kwargs)
    if accelerator.scaler is None:  # Accelerate 1.15 on the CPU: give it the GPU's fp16 path
        accelerator.scaler = torch.amp.GradScaler(
            "cpu", init_scale=INIT_SCALE, growth_interval=1000
        )
        accelerator.native_amp = True
    return accelerator


def dropped_index(step: int, index: int, numel: int) -> int:
    """An element of parameter ``index`` that DropGrad's mask drops at ``step``."""
    t = F.drop_threshold(RATE)
    keep = F.keep_mask_reference(numel, F.derive_key(SEED, step, index), t)
    return int((~keep).nonzero()[0])


def run_fp16(wrap: bool, rate: float, bad: dict[int, float], steps: int = 5) -> dict:
    """A plain Accelerate fp16 loop; at step ``k`` in ``bad`` one gradient element becomes
    ``bad[k]`` (inf or NaN) after the backward, in an element the mask would drop."""
    accelerator = fp16_accelerator()
    model = tiny_mlp()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer = DropGrad(inner, drop_rate=rate, seed=SEED) if wrap else inner
    model, prepared = accelerator.prepare(model, optimizer)
    params = list(model.parameters())
    seen: list[tuple[int, list[torch.Tensor]]] = []
    inner.register_step_pre_hook(
        lambda *a: seen.append((getattr(optimizer, "step_count", -1),
                                [p.grad.clone() for p in params]))
    )
    history = []
    finished = 0  # optimizer steps taken so far: the step DropGrad's next mask belongs to
    for step in range(steps):
        accelerator.backward(loss_of(model, step))
        record = {
            "scale": accelerator.scaler.get_scale(),
            "scaled": [p.grad.clone() for p in params],
            "before": [p.detach().clone() for p in params],
            "count": getattr(optimizer, "step_count", None),
        }
        if step in bad:
            position = dropped_index(finished, 0, params[0].numel())
            params[0].grad.view(-1)[position] = bad[step]
        # Unscales (once), then clips; max_norm so large that clipping multiplies by 1.0.
        accelerator.clip_grad_norm_(model.parameters(), 1e6)
        prepared.step()
        prepared.zero_grad()
        record.update(
            skipped=prepared.step_was_skipped,
            scale_after=accelerator.scaler.get_scale(),
            after=[p.detach().clone() for p in params],
            count_after=getattr(optimizer, "step_count", None),
        )
        finished += not record["skipped"]
        history.append(record)
    return {"history": history, "seen": seen, "optimizer": optimizer}


@pytest.mark.parametrize("bad_value", [float("inf"), float("nan")])
def test_fp16_bad_step_is_skipped_and_grads_are_unscaled_once(bad_value: float) -> None:
    out = run_fp16(wrap=True, rate=RATE, bad={2: bad_value})
    history, seen = out["history"], out["seen"]
    t = F.drop_threshold(RATE)
    for step, rec in enumerate(history):
        assert all(torch.isfinite(p).all() for p in rec["after"]), step  # never a NaN
        assert rec["skipped"] == (step == 2), step
        if step == 2:
            # the scaler saw the inf/NaN although the mask would have dropped that element
            assert all(torch.equal(a, b) for a, b in zip(rec["before"], rec["after"]))
            assert rec["scale_after"] == rec["scale"] * 0.5  # the scale dropped
            assert rec["count_after"] == rec["count"]  # no mask drawn, step not counted
        else:
            assert rec["scale_after"] == rec["scale"]
            assert rec["count_after"] == rec["count"] + 1
            assert not all(torch.equal(a, b) for a, b in zip(rec["before"], rec["after"]))
    # DropGrad ran once per finished step, with consecutive steps despite the skip ...
    assert [count for count, _ in seen] == [0, 1, 2, 3]
    assert out["optimizer"].step_count == 4
    # ... and the inner optimizer got exactly mask(scaled / scale): unscaled once, then masked
    finished = [rec for step, rec in enumerate(history) if step != 2]
    for rec, (count, grads) in zip(finished, seen):
        for index, (scaled, got) in enumerate(zip(rec["scaled"], grads)):
            expected = scaled * (1.0 / rec["scale"])
            F.mask_reference_(expected, F.derive_key(SEED, count, index), t, F.keep_scale(t))
            assert torch.equal(got, expected), (count, index)
            twice = scaled * (1.0 / rec["scale"]) ** 2
            assert not torch.equal(got, twice)


def test_fp16_rate_zero_is_bit_identical_to_the_bare_optimizer() -> None:
    wrapped = run_fp16(wrap=True, rate=0.0, bad={2: float("inf")})
    bare = run_fp16(wrap=False, rate=0.0, bad={2: float("inf")})
    for a, b in zip(wrapped["history"], bare["history"]):
        assert a["skipped"] == b["skipped"] and a["scale_after"] == b["scale_after"]
        for x, y in zip(a["after"], b["after"]):
            assert torch.equal(x, y)
    assert wrapped["optimizer"].step_count == 4
    assert sum(r["skipped"] for r in bare["history"]) == 1


# -- the Trainer's fp16 path: clip (unscale) -> on_pre_optimizer_step -> step ------------------


def tiny_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def classification_rows(n: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (n, 8), generator=g)
    return [{"input_ids": row, "labels": int(row[0] % 3)} for row in ids]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["optimizers", "trainer", "callback"])
def test_fp16_trainer_masks_every_step_over_once_unscaled_grads(tmp_path, how: str) -> None:
    """The Trainer's fp16 path with DropGrad passed through ``optimizers=`` (prepared by
    Accelerate), wrapped by ``DropGradTrainer.create_optimizer`` (before ``prepare``), or
    installed by ``DropGradCallback`` on a plain ``Trainer`` after ``prepare`` (Accelerate's
    captured fp16 step must then be re-captured, or the scaler steps the bare optimizer)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_dropgrad import DropGradCallback, DropGradTrainer

    model = tiny_bert_classifier()
    args = TrainingArguments(
        output_dir=str(tmp_path), fp16=True, use_cpu=True, max_steps=3, optim="sgd",
        learning_rate=0.1, max_grad_norm=1e6, per_device_train_batch_size=8,
        report_to="none", save_strategy="no", seed=SEED, disable_tqdm=True,
    )
    common = dict(model=model, args=args, train_dataset=classification_rows())
    if how == "optimizers":
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        dropgrad = DropGrad(inner, drop_rate=RATE, seed=SEED)
        # used as it is: DropGrad settings next to it would be an error
        trainer = DropGradTrainer(**common, optimizers=(dropgrad, None))
    elif how == "trainer":
        trainer = DropGradTrainer(**common, dropgrad_rate=RATE)
    else:
        trainer = Trainer(**common)
        trainer.add_callback(DropGradCallback(drop_rate=RATE))
    fp16_accelerator_of = trainer.accelerator
    if fp16_accelerator_of.scaler is None:  # see the module docstring
        fp16_accelerator_of.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
        fp16_accelerator_of.native_amp = True
    params: list[torch.Tensor] = []  # in DropGrad's order: a parameter's position is its key
    scaled: list[list[torch.Tensor]] = []
    masked: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            dropgrad = get_dropgrad(optimizer)
            params.extend(p for group in dropgrad.param_groups for p in group["params"])
            received: list[torch.Tensor] = []
            dropgrad.register_step_pre_hook(
                lambda *a: received.__setitem__(slice(None), [p.grad.clone() for p in params])
            )
            dropgrad.optimizer.register_step_pre_hook(
                lambda *a: masked.append(
                    (dropgrad.step_count, list(received), [p.grad.clone() for p in params])
                )
            )

    trainer.add_callback(Spy())
    backward = trainer.accelerator.backward

    def backward_and_record(loss, **kwargs):  # the gradients as the backward leaves them: scaled
        backward(loss, **kwargs)
        scaled.append([p.grad.clone() for p in params])

    trainer.accelerator.backward = backward_and_record
    trainer.train()
    scale = fp16_accelerator_of.scaler.get_scale()
    assert scale == INIT_SCALE  # no overflow in this run, so the scale never moved
    assert [m[0] for m in masked] == [0, 1, 2]  # DropGrad ran at every optimizer step
    t = F.drop_threshold(RATE)
    assert len(scaled) == len(masked) == 3
    for (step, received, got), raw in zip(masked, scaled):
        assert len(raw) == len(received) == len(got) == len(params) > 0  # DropGrad.step ran
        for index, (g, r, m) in enumerate(zip(raw, received, got)):
            assert torch.equal(r, g * (1.0 / scale))  # unscaled exactly once, before the mask
            expected = r.clone()
            F.mask_reference_(expected, F.derive_key(SEED, step, index), t, F.keep_scale(t))
            assert torch.equal(m, expected)


# -- bf16 (and fp16) gradients --------------------------------------------------------------


def test_bf16_gradients_are_masked_in_bf16_under_accelerate() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = tiny_mlp().to(torch.bfloat16)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = DropGrad(inner, drop_rate=0.3, seed=SEED)
    model, prepared = accelerator.prepare(model, optimizer)
    params = list(model.parameters())
    received: list[torch.Tensor] = []
    masked: list[torch.Tensor] = []
    optimizer.register_step_pre_hook(lambda *a: received.extend(p.grad.clone() for p in params))
    inner.register_step_pre_hook(lambda *a: masked.extend(p.grad.clone() for p in params))
    x, y = (t.to(accelerator.device) for t in (torch.randn(16, 8), torch.randint(0, 3, (16,))))
    with accelerator.autocast():
        loss = torch.nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y)
    accelerator.backward(loss)
    prepared.step()
    t = F.drop_threshold(0.3)
    assert len(masked) == len(params)
    for index, (r, m) in enumerate(zip(received, masked)):
        assert r.dtype == m.dtype == torch.bfloat16
        expected = r.clone()  # the reference rounds float(g) * factor once to bf16
        F.mask_reference_(expected, F.derive_key(SEED, 0, index), t, F.keep_scale(t))
        assert torch.equal(m, expected)
    dropped = sum(int(((m == 0) & (r != 0)).sum()) for r, m in zip(received, masked))
    nonzero = sum(int((r != 0).sum()) for r in received)
    assert 0.2 < dropped / nonzero < 0.4


def test_fp16_gradients_are_masked_in_fp16() -> None:
    model = tiny_mlp().to(torch.float16)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = DropGrad(inner, drop_rate=0.3, seed=SEED)
    params = list(model.parameters())
    x, y = torch.randn(16, 8, dtype=torch.float16), torch.randint(0, 3, (16,))
    torch.nn.functional.cross_entropy(model(x).float(), y).backward()
    received = [p.grad.clone() for p in params]
    masked: list[torch.Tensor] = []
    inner.register_step_pre_hook(lambda *a: masked.extend(p.grad.clone() for p in params))
    optimizer.step()
    t = F.drop_threshold(0.3)
    for index, (r, m) in enumerate(zip(received, masked)):
        assert m.dtype == torch.float16
        expected = r.clone()
        F.mask_reference_(expected, F.derive_key(SEED, 0, index), t, F.keep_scale(t))
        assert torch.equal(m, expected)


class NoStep(torch.optim.Optimizer):
    """An inner optimizer that does nothing, so a profile of ``DropGrad.step`` is the mask's."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def peak_allocation(fn) -> int:
    """An upper bound on the peak CPU bytes allocated and not yet freed while ``fn`` runs.

    The profiler gives each op its own ("self") allocations minus the frees in its scope;
    counting allocations at the op's start and frees at its end can only overestimate.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []
    for event in prof.events():
        delta = event.self_cpu_memory_usage
        if delta:
            at = event.time_range.start if delta > 0 else event.time_range.end
            changes.append((at, delta < 0, delta))  # at equal times, allocations first
    running = peak = 0
    for _, _, delta in sorted(changes):
        running += delta
        peak = max(peak, running)
    return peak


def test_bf16_masking_allocates_no_fp32_copy_of_the_gradient() -> None:
    from hf_dropgrad.kernels import cpp

    if cpp.load() is None:
        pytest.skip("the fused CPU kernel is unavailable here; the reference path bounds its "
                    "temporaries per 256K-element span, not per gradient")
    big = torch.nn.Parameter(torch.zeros(1024, 1024, dtype=torch.bfloat16))
    small = torch.nn.Parameter(torch.zeros(300, dtype=torch.bfloat16))
    for p in (big, small):
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
    optimizer = DropGrad(NoStep([big, small]), drop_rate=0.3, seed=SEED)
    optimizer.step()  # warm-up: the kernel is loaded, the first call's lazy state made
    before = big.grad.clone()
    numel = big.numel()
    # the measure sees a full fp32 copy (4 bytes per element) ...
    assert peak_allocation(lambda: big.grad.float()) >= 4 * numel
    # ... and DropGrad's masking stays under 1 byte per element of the largest gradient
    peak = peak_allocation(optimizer.step)
    assert peak <= numel, peak
    assert big.grad.dtype == torch.bfloat16
    t = F.drop_threshold(0.3)
    F.mask_reference_(before, F.derive_key(SEED, 1, 0), t, F.keep_scale(t))
    assert torch.equal(big.grad, before)  # the profiled step did mask

"""Records, at every optimizer step of a Trainer run, the gradient DropGrad received and the
gradient the optimizer that updates the parameters read ("at the source"), and the parameters
before and after the step; and checks them against the masks of the stream."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from hf_dropgrad import functional as F
from hf_dropgrad.integrations.in_backward import find_in_backward, kind_of
from hf_dropgrad.optimizer import get_dropgrad


class _ReadSpy:
    """Stands for LOMO's ``model``: LOMO's hooks read each ready gradient while iterating
    ``model.named_parameters()``; this records it as it is yielded, just before LOMO reads it."""

    def __init__(self, model: torch.nn.Module, record: Any) -> None:
        self._model, self._record = model, record

    def named_parameters(self, *args: Any, **kwargs: Any):
        for name, p in self._model.named_parameters(*args, **kwargs):
            if p.requires_grad and p.grad is not None:
                self._record(p, p.grad)
            yield name, p

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class SourceSpy(TrainerCallback):
    """Add after DropGrad's callback (``trainer.add_callback``). ``raw[(step, position)]``: the
    gradient before DropGrad masks it; ``seen[(step, position)]``: the gradient the updating
    optimizer read; ``updates``: ``(step, parameters before, after)`` per optimizer step."""

    def __init__(self) -> None:
        self.raw: dict[tuple[int, int], torch.Tensor] = {}
        self.seen: dict[tuple[int, int], torch.Tensor] = {}
        self.updates: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []
        self._before: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        dropgrad = self.dropgrad = get_dropgrad(optimizer)
        params = self.params = [p for g in dropgrad.param_groups for p in g["params"]]
        position = {id(p): i for i, p in enumerate(params)}

        def record(into: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
            into.setdefault((dropgrad.step_count, position[id(p)]), grad.detach().clone())

        if not dropgrad.in_backward:
            def before_mask(*_: Any) -> None:
                for p in params:
                    if p.grad is not None:
                        record(self.raw, p, p.grad)

            def at_step(*_: Any) -> None:
                for p in params:
                    if p.grad is not None:
                        record(self.seen, p, p.grad)

            dropgrad.register_step_pre_hook(before_mask)
            dropgrad.optimizer.register_step_pre_hook(at_step)
            return
        # updates inside backward(): the incoming gradient (the gradient is None before each
        # backward) is the raw one; the updating optimizer's read is the masked one
        for p in params:
            if p.requires_grad:
                p.register_hook(lambda g, p=p: record(self.raw, p, g))
        stepper = find_in_backward(optimizer)
        if kind_of(stepper) == "lomo":
            stepper.model = _ReadSpy(stepper.model, lambda p, g: record(self.seen, p, g))
        else:  # layer-wise: each parameter's own optimizer, as DropGrad's MaskedStep steps it
            for inner in dropgrad.optimizer.optimizers:
                def at_step(o: torch.optim.Optimizer, *_: Any) -> None:
                    for g in o.param_groups:
                        for p in g["params"]:
                            if p.grad is not None:
                                record(self.seen, p, p.grad)

                inner.register_step_pre_hook(at_step)

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._before = [p.detach().clone() for p in self.params]

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        after = [p.detach().clone() for p in self.params]
        self.updates.append((state.global_step, self._before, after))

    # -- checks ---------------------------------------------------------------------------

    def check_masks(self, rate: float, steps: int | range) -> None:
        """Every gradient the updating optimizer read is DropGrad's raw gradient masked by the
        stream's mask of ``(seed, step, position)``: the dropped set is exactly the expected
        one, at every step (``range(steps)``, or the given range), for every parameter that had
        a gradient."""
        t = F.drop_threshold(rate)
        steps = range(steps) if isinstance(steps, int) else steps
        assert {step for step, _ in self.seen} == set(steps), sorted(self.seen)
        assert set(self.seen) == set(self.raw), (sorted(set(self.raw) ^ set(self.seen)))
        dropped = 0
        for (step, index), seen in self.seen.items():
            raw = self.raw[(step, index)]
            want = raw.clone()
            F.mask_reference_(want, F.derive_key(self.dropgrad.seed, step, index), t,
                              F.keep_scale(t))
            assert torch.equal(seen, want), (step, index)
            dropped += int(((seen == 0) & (raw != 0)).sum())
        assert dropped > 0

    def check_frozen(self, rate: float) -> None:
        """Full update drop: at every step each dropped element of a parameter that had a
        gradient is bit-identical after the step; kept elements moved."""
        t = F.drop_threshold(rate)
        moved = False
        for step, before, after in self.updates:
            for index, (b, a) in enumerate(zip(before, after)):
                if (step, index) not in self.raw:
                    continue
                key = F.derive_key(self.dropgrad.seed, step, index)
                keep = F.keep_mask_reference(b.numel(), key, t).view_as(b)
                assert torch.equal(a[~keep], b[~keep]), (step, index)
                moved |= not torch.equal(a[keep], b[keep])
        assert self.updates and moved

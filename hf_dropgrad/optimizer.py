"""``DropGrad``: gradient dropout as an optimizer wrapper."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from hf_dropgrad import functional as F
from hf_dropgrad import kernels, report
from hf_dropgrad.in_backward import InBackward, served_by
from hf_dropgrad.layout import Box, FlatLayout, Local, Whole, local_target
from hf_dropgrad.optimizer_hooks import init_optimizer_hooks
from hf_dropgrad.rates import RateTable
from hf_dropgrad.schedulers import DropRateScheduler, check_rate_number

__all__ = ["SEED_LIMIT", "DropGrad", "get_dropgrad", "optimizer_chain"]

_STATE_KEY = "dropgrad"
_STATE_VERSION = 1
#: Seeds are ints in ``[0, SEED_LIMIT)``: the masks' stream is keyed by 64 bits.
SEED_LIMIT = 2**64


@dataclass(frozen=True)
class MaskTarget:
    """What one step masks for one parameter (or a local piece of one): its ``local`` share
    (:class:`~hf_dropgrad.layout.Local`: the boxes of its values and of its gradient), the
    mask's ``key`` and ``threshold``, and the ``scale`` of the kept elements."""

    local: Local
    key: int
    threshold: int
    scale: float
    name: str | int


class DropGrad(Optimizer):
    r"""Wrap ``optimizer`` so that every step first drops gradient elements.

    Before each step of the inner optimizer, every gradient element of a parameter with
    drop rate ``p`` is zeroed with probability ``p`` and the survivors are multiplied by
    the reciprocal of the keep probability, so the expected gradient is unchanged.
    ``DropGrad`` *is* an :class:`~torch.optim.Optimizer` that shares the inner optimizer's
    ``param_groups``, ``state`` and ``defaults``: LR schedulers, ``GradScaler``,
    Accelerate and ``Trainer`` accept it as they accept the inner optimizer.

    Args:
        optimizer: the optimizer to wrap (any :class:`torch.optim.Optimizer`).
        drop_rate: default rate for every parameter that ``params`` does not give one.
            ``None`` with no ``params`` and no scheduler is an error.
        params: per-parameter rates: ``{parameter: rate}`` and/or ``{"pattern": rate}``,
            where a pattern names submodules (``{"encoder": 0.1, "decoder": 0.2}``) or is
            a regex over parameter names; see :mod:`hf_dropgrad.patterns`. Patterns are
            resolved against ``model`` or, without it, the ``param_names`` torch stores
            when the optimizer was built from ``model.named_parameters()``.
        model: the module whose parameter names the patterns and :meth:`current_rates`
            use.
        drop_rate_scheduler: a :class:`~hf_dropgrad.schedulers.DropRateScheduler`,
            stepped by ``DropGrad`` after every optimizer step. Without per-parameter rates
            its rate is every parameter's rate; with them it scales each parameter's base
            rate by ``r(k) / r(0)`` (capped at 1).
        full_update_drop: if ``True`` a dropped element is frozen for that step: its value
            after :meth:`step` is bit-identical to before, whatever the inner optimizer
            does (momentum, weight decay, ...). The inner optimizer's *state* for a
            dropped element evolves as it would for a zero gradient (e.g. Adam's moments
            decay). Memory: the values of the dropped elements (``p`` times the parameter
            bytes) and one int64 per 4096 elements; on the reference path (non-contiguous
            parameters, devices without a fused backend, ``HF_DROPGRAD_BACKEND=torch``)
            also a 1-byte-per-element mask of one parameter at a time.
        seed: seed of the masks, an int in ``[0, 2**64)`` (the key space of the masks'
            stream; ``--dropgrad_seed`` follows the same rule); default
            ``torch.initial_seed()`` at construction. The mask of a step depends only on
            ``(seed, step, parameter position)``.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-3), drop_rate=0.1)
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        drop_rate: float | None = None,
        params: Mapping[Any, float] | None = None,
        *,
        model: torch.nn.Module | None = None,
        drop_rate_scheduler: DropRateScheduler | None = None,
        full_update_drop: bool = False,
        seed: int | None = None,
    ) -> None:
        # No super().__init__(): the parameter groups and state are the inner optimizer's.
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer instance, "
                f"got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, DropGrad):
            raise ValueError("optimizer is already a DropGrad; wrap the inner optimizer once")
        _refuse_updates_outside_step(optimizer)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if drop_rate_scheduler is not None and not isinstance(
            drop_rate_scheduler, DropRateScheduler
        ):
            raise TypeError(
                "drop_rate_scheduler must be a hf_dropgrad DropRateScheduler (Constant, Linear, "
                f"CosineAnnealing or Step), got {type(drop_rate_scheduler).__name__}"
            )
        if not isinstance(full_update_drop, bool):
            raise TypeError(f"full_update_drop must be a bool, got {full_update_drop!r}")
        # An unknown HF_DROPGRAD_BACKEND, or a forced backend that cannot run here at all,
        # fails before training; whether it takes each parameter is checked once they sit on
        # their device (check_backend, at the first step or the Trainer's on_train_begin).
        kernels.check_forced_backend()
        if seed is None:
            seed = torch.initial_seed()
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        elif not 0 <= seed < SEED_LIMIT:
            raise ValueError(
                f"seed must be an int in [0, 2**64) (the key of the masks' stream), got {seed!r}"
            )

        _refuse_duplicates(optimizer.param_groups)
        self.optimizer = optimizer
        init_optimizer_hooks(self)  # not Optimizer.__init__: the groups are the inner one's

        self.seed = seed
        self.full_update_drop = full_update_drop
        self._step_count_dropgrad = 0
        self._backend_checked = False
        self._layout: FlatLayout | None = None
        # Optimizers that update inside backward() (InBackward): the gradients are masked in
        # hooks (mask_parameter), step() only ends the optimizer step.
        self._in_backward = isinstance(optimizer, InBackward)
        self._pending: dict[int, _Restore] = {}  # full update drop, restored by step()
        self._masks_in_step = 0
        self._wiring_checked = False
        self._positions: dict[int, int] | None = None
        # Rates, names and patterns are keyed by parameter *position*, never by tensor object:
        # Accelerate's FSDP2 preparation and DeepSpeed replace the tensors in param_groups.
        self._table = RateTable.resolve(
            optimizer.param_groups, drop_rate, params, model, drop_rate_scheduler
        )

        if drop_rate is None and not self._table.rates and drop_rate_scheduler is None:
            raise ValueError(
                "DropGrad needs drop_rate (a float in [0, 1]), params ({parameter or name "
                "pattern: rate}) or drop_rate_scheduler"
            )
        if drop_rate_scheduler is not None:
            initial = drop_rate_scheduler.rate_at(0)
            if self._table.rates and initial == 0.0:
                raise ValueError(
                    "drop_rate_scheduler starts at 0 but per-parameter rates were given: the "
                    "schedule scales each parameter's rate by r(k) / r(0), which is undefined "
                    "for r(0) = 0. Start the schedule above 0, or drop params= and let the "
                    "schedule set every parameter's rate."
                )
            if not self._table.rates and drop_rate is not None and drop_rate != initial:
                raise ValueError(
                    f"drop_rate={drop_rate} conflicts with drop_rate_scheduler, whose initial "
                    f"rate is {initial}: pass one of them, or make them agree"
                )

    # -- sharing the inner optimizer's attributes -------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def drop_rate_scheduler(self) -> DropRateScheduler | None:
        """The drop-rate schedule, stepped after every optimizer step (or ``None``)."""
        return self._table.scheduler

    @drop_rate_scheduler.setter
    def drop_rate_scheduler(self, value: DropRateScheduler | None) -> None:
        self._table.scheduler = value

    @property
    def drop_rate(self) -> float | None:
        """The default rate at the current step (scheduled when a scheduler is set)."""
        return self._table.default_rate()

    @drop_rate.setter
    def drop_rate(self, value: float | None) -> None:
        if self._table.scheduled_uniformly:
            raise ValueError(
                "drop_rate is set by drop_rate_scheduler; change the scheduler instead"
            )
        self._table.base_rate = None if value is None else check_rate_number(value, "drop_rate")

    def get_drop_rate(self) -> float | None:
        """Alias of :attr:`drop_rate` (the ``dropgrad`` packages' name for the current rate)."""
        return self.drop_rate

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far (the step part of the masks' key)."""
        return self._step_count_dropgrad

    def set_step(self, step: int) -> None:
        """Make the next :meth:`step` be optimizer step number ``step`` (0-based).

        Sets the step part of the masks' key and the scheduler's position. Integrations
        that own the step counter call this before every step: the Trainer layer passes
        ``state.global_step``, so masks and schedule follow the Trainer's step even when
        a run resumes from a checkpoint whose optimizer state was saved without DropGrad.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self._step_count_dropgrad = step
        if self.drop_rate_scheduler is not None:
            self.drop_rate_scheduler.last_step = step

    # -- rates (a RateTable; the report in hf_dropgrad.report) ------------------------------

    def _all_params(self) -> Iterator[torch.Tensor]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    def name_parameters(self, model: torch.nn.Module) -> None:
        """Name the parameters that have no name yet after ``model``'s ``named_parameters()``.

        For a ``DropGrad`` built without ``model=`` from ``model.parameters()``: afterwards
        :meth:`current_rates`, :meth:`describe` and the Trainer's logs use names, not positions.
        """
        position = {p: i for i, p in enumerate(self._all_params())}
        for name, p in model.named_parameters():
            if p in position:
                self._table.name(position[p], name)

    def current_rates(self) -> dict[str | int, float]:
        """``{parameter name (or position when unnamed): rate}`` for the next step.

        Parameters with no rate are left out; an explicit ``0.0`` is listed.
        """
        return self._table.current_rates()

    def rate_groups(self) -> dict[str, float]:
        """Current rate by where it came from: ``{"default": r}`` for ``drop_rate``, the pattern
        for name-pattern rates, ``"params"`` for ``{parameter: rate}`` entries (their largest
        rate). What the Trainer layer logs.
        """
        return report.rate_groups(self._table)

    def describe(self) -> str:
        """A table of which parameters got which rate (printed by the Trainer layer)."""
        return report.describe(self._table)

    # -- the step ------------------------------------------------------------------------------

    def check_backend(self) -> None:
        """Fail now if ``HF_DROPGRAD_BACKEND`` forces a backend that cannot mask a parameter
        that has a rate (its device or dtype: ``cpp`` and a float64 or CUDA parameter, ...).

        :meth:`step` calls it before its first step, before the inner optimizer or any
        gradient is touched; the Trainer layer calls it at the start of training, when the
        parameters sit on their device (Accelerate may move them after ``DropGrad`` is built,
        so construction does not check them).

        Raises:
            ~hf_dropgrad.kernels.BackendUnavailableError: naming the parameter and why.
        """
        def named() -> Iterator[tuple[str, torch.Tensor]]:
            for index, local in self._locals():
                name = self._table.name_of(index)
                for box in local.values():
                    yield f"parameter {name}" if isinstance(name, int) else name, box.tensor

        kernels.check_backend_accepts(named())  # read only when a backend is forced
        self._backend_checked = True

    def may_mask(self, index: int) -> bool:
        """Whether the parameter at position ``index`` can ever be masked: it has a rate, and
        that rate is not 0 with no schedule. The others are never touched (nor checked)."""
        rate = self._table.rate_of(index)
        return rate is not None and (rate != 0.0 or self.drop_rate_scheduler is not None)

    def _locals(self) -> Iterator[tuple[int, Local]]:
        """``(position, local share)`` of every parameter this process may mask: the parameter
        whole, a :class:`~hf_dropgrad.layout.Piece` of one (a run of an engine's flat
        partition), or the boxes of a sharded (DTensor) parameter."""
        if self._layout is not None:
            for index, piece in self._layout.pieces(self.optimizer.param_groups):
                if self.may_mask(index):
                    yield index, piece
            return
        params = list(self._all_params())
        if len(params) != self.num_params:
            # Positions key the masks: with other tensors in param_groups they would be wrong.
            raise RuntimeError(
                f"DropGrad was built over {self.num_params} parameters but its optimizer now "
                f"holds {len(params)} tensors. An engine replaced them (DeepSpeed ZeRO steps "
                "flat partitions): the Trainer handles that; in your own DeepSpeed loop call "
                "hf_dropgrad.integrations.deepspeed.attach_deepspeed(engine.optimizer) after "
                "deepspeed.initialize. To add parameters, use DropGrad.add_param_group."
            )
        for index, p in enumerate(params):
            if self.may_mask(index):
                yield index, local_target(p, self._table.name_of(index))

    @property
    def in_backward(self) -> bool:
        """Whether the inner optimizer updates inside ``backward()`` (an
        :class:`~hf_dropgrad.in_backward.InBackward`): the gradients are masked in hooks
        (:meth:`mask_parameter`), and :meth:`step` only ends the optimizer step."""
        return self._in_backward

    def has_gradients(self) -> bool:
        """Whether a parameter that may be masked holds a gradient now."""
        return any(local.grads() is not None for _, local in self._locals())

    @property
    def num_params(self) -> int:
        """How many parameters DropGrad was built over (positions ``0 .. num_params - 1``)."""
        return self._table.num_params

    @property
    def layout(self) -> FlatLayout | None:
        """The :class:`~hf_dropgrad.layout.FlatLayout` set by :meth:`set_layout`, if any."""
        return self._layout

    def set_layout(self, layout: FlatLayout | None) -> None:
        """Mask the runs ``layout`` maps instead of the parameters (an engine's flat
        partitions, e.g. DeepSpeed ZeRO's), and leave advancing the step count to the engine,
        which calls :meth:`step` once per group and :meth:`advance` once per optimizer step.
        ``None`` goes back to masking the parameters."""
        if layout is not None and not isinstance(layout, FlatLayout):
            raise TypeError(f"layout must be a FlatLayout or None, got {type(layout).__name__}")
        if layout is not None and self._in_backward:
            raise ValueError("DropGrad over InBackward masks the parameters, not an engine's "
                             "flat partitions: set_layout does not apply")
        self._layout = layout

    def name_of(self, index: int) -> str | int:
        """The name of the parameter at position ``index``, or ``index`` when it has none."""
        return self._table.name_of(index)

    def advance(self) -> None:
        """One optimizer step is done: advance the step count and the scheduler.

        :meth:`step` calls this itself, except under a :meth:`set_layout` engine."""
        self._step_count_dropgrad += 1
        if self.drop_rate_scheduler is not None:
            self.drop_rate_scheduler.step()

    def _targets(self) -> list[MaskTarget]:
        """A :class:`MaskTarget` for every parameter (or local piece of one) with a positive
        rate."""
        return self._targets_of(self._locals())

    def _targets_of(self, locals_: Iterable[tuple[int, Local]]) -> list[MaskTarget]:
        """The :class:`MaskTarget` of each ``(position, local share)`` with a positive rate."""
        out = []
        for index, local in locals_:
            rate = self._table.rate_of(index)
            if not rate:
                continue
            threshold = F.drop_threshold(rate)
            if threshold == 0:
                continue
            key = F.derive_key(self.seed, self._step_count_dropgrad, index)
            out.append(MaskTarget(local, key, threshold, F.keep_scale(threshold),
                                  self._table.name_of(index)))
        return out

    @staticmethod
    def _check_grad(grad: torch.Tensor, name: str | int) -> None:
        label = f"parameter {name}" if isinstance(name, int) else name
        if grad.is_sparse:
            raise RuntimeError(
                f"DropGrad does not support sparse gradients ({label}: e.g. "
                "nn.Embedding(sparse=True)); use dense gradients or leave that parameter without "
                "a rate"
            )
        if type(grad).__name__ == "DTensor":
            # DTensor parameters are masked through their local boxes (integrations.dtensor);
            # a DTensor gradient on a plain parameter has no known place in the parameter.
            raise RuntimeError(
                f"DropGrad got a sharded (DTensor) gradient for {label}, which is not a DTensor, "
                "so it cannot tell where the shard sits in the full parameter. Shard parameters "
                "with FSDP2 (fully_shard) or parallelize_module, which DropGrad masks exactly."
            )
        if not grad.is_floating_point():
            raise TypeError(
                f"DropGrad can only mask floating-point gradients, got {grad.dtype} ({label})"
            )

    def _grads(self, targets: list[MaskTarget]) -> list[tuple[MaskTarget, Sequence[Box]]]:
        """The targets that have a gradient, with its boxes, each checked by
        :meth:`_check_grad`."""
        live = []
        for t in targets:
            boxes = t.local.grads()
            if boxes is None:
                continue
            for box in boxes:
                self._check_grad(box.tensor, t.name)
            live.append((t, boxes))
        return live

    def _mask(self, targets: list[MaskTarget]) -> None:
        live = self._grads(targets)
        in_place = [(t, boxes) for t, boxes in live if not _requires_grad(boxes)]
        F.mask_(*_lists(in_place, with_scales=True))
        for t, boxes in live:
            if _requires_grad(boxes):
                _mask_out_of_place(t)

    def _snapshot_dropped(self, targets: list[MaskTarget], mask: bool = False) -> _Restore:
        """Save what full update drop restores after the step; with ``mask``, mask the
        gradients too.

        A parameter in an autograd graph (its gradient requires grad, as under
        ``differentiable=True``, or it is a non-leaf that requires grad) keeps its values before
        the step, and the restore goes through autograd (:class:`_Restore`); the others keep
        only their dropped values (:meth:`_save_dropped`)."""
        graph = [t for t in targets if _in_graph(t)]
        rest = [t for t in targets if not _in_graph(t)]
        saved = []
        for t in graph:
            param = t.local.param  # a Whole: _in_graph says so
            keep = F.keep_mask(param.numel(), t.key, t.threshold, param.device)
            if param.requires_grad and not param.is_leaf:
                with torch.enable_grad():
                    before = param.clone()  # carries the parameter's graph
            else:
                before = param.detach().clone()
            saved.append((param, keep.view(param.shape), before))
            if mask and param.grad is not None:
                _mask_out_of_place(t)
        return _Restore(self._save_dropped(rest, mask) if rest else None, saved)

    def _save_dropped(self, targets: list[MaskTarget], mask: bool) -> F.DroppedValues:
        """Save the parameters' dropped values; with ``mask``, mask the gradients too (one
        hashing pass fewer where a gradient sits where its values do: the mask counts what the
        save packs)."""
        values = [(t, t.local.values()) for t in targets]
        if not mask:
            return _save(values)
        grads = self._grads(targets)
        with_grad = {id(t): boxes for t, boxes in grads}
        paired, grads_apart, values_apart = [], [], []
        for t, boxes in values:
            gboxes = with_grad.get(id(t))
            if gboxes is not None and [b.place for b in gboxes] == [b.place for b in boxes]:
                paired.append((t, boxes, gboxes))
            else:
                values_apart.append((t, boxes))
                if gboxes is not None:  # e.g. a Replicate gradient of a Shard parameter
                    grads_apart.append((t, gboxes))
        parts = []
        if paired:
            flat = [(t, v, g) for t, vb, gb in paired for v, g in zip(vb, gb)]
            parts.append(F.mask_and_save_dropped_many(
                [g.tensor for _, _, g in flat], [v.tensor for _, v, _ in flat],
                [t.key for t, _, _ in flat], [t.threshold for t, _, _ in flat],
                [t.scale for t, _, _ in flat], *zip(*(v.place for _, v, _ in flat)),
            ))
        if grads_apart:
            F.mask_(*_lists(grads_apart, with_scales=True))
        if values_apart:
            parts.append(_save(values_apart))
        return F.DroppedValues.join(*parts)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Mask the gradients, then take the inner optimizer's step.

        Args:
            closure: re-evaluates the model and returns the loss; its gradients are masked
                (with this step's mask) each time the inner optimizer calls it.
        """
        if not self._backend_checked:
            self.check_backend()  # before anything is touched
        if self._in_backward:
            return self._end_step_in_backward(closure)
        targets = self._targets()
        saved = None
        if self.full_update_drop and targets:
            live = self._grads(targets)  # refuse bad gradients before touching parameters
            with torch.no_grad():
                # Without a closure only parameters that have a gradient can move.
                moving = targets if closure is not None else [t for t, _ in live]
                saved = self._snapshot_dropped(moving, mask=closure is None)
        if closure is None:
            if saved is None:  # else _snapshot_dropped masked them
                with torch.no_grad():
                    self._mask(targets)
            loss = self.optimizer.step()
        else:

            def masked_closure() -> Any:
                loss = closure()
                with torch.no_grad():
                    self._mask(targets)
                return loss

            loss = self.optimizer.step(masked_closure)
        if saved is not None:
            saved.restore()
        if self._layout is None:  # under ZeRO the engine's step advances it, once for all groups
            self.advance()
        return loss

    # -- optimizers that update inside backward() (InBackward) ------------------------------

    def _require_in_backward(self, what: str) -> None:
        if not self._in_backward:
            raise RuntimeError(
                f"DropGrad.{what} is for optimizers that update the parameters inside "
                "backward(), wrapped as DropGrad(InBackward(...)); this DropGrad masks the "
                f"gradients in step(), before {type(self.optimizer).__name__} steps"
            )

    def _position_of(self, param: torch.Tensor) -> int:
        if self._positions is None:
            self._positions = {id(p): i for i, p in enumerate(self._all_params())}
        index = self._positions.get(id(param))
        if index is None:
            raise ValueError(
                f"a tensor of shape {tuple(param.shape)} is not a parameter of this DropGrad's "
                "optimizer"
            )
        return index

    def mask_parameter(self, param: torch.Tensor) -> None:
        """Mask ``param``'s gradient now, with this optimizer step's mask of ``param``.

        For optimizers that update inside ``backward()`` (``DropGrad(InBackward(...))``): call
        it where the update will read the gradient, before it does, e.g. from a
        post-accumulate-grad hook (:meth:`register_mask_hooks` registers such hooks). The key is
        ``(seed, step, position of param)``, as in :meth:`step`, so the mask is the one a plain
        ``DropGrad`` over the same parameters draws. With ``full_update_drop`` the parameter's
        dropped values are saved too (the first time in a step), and the next :meth:`step`
        puts them back; :meth:`parameter_step` puts them back at once. A parameter without a
        rate or a gradient is left alone.

        Raises:
            RuntimeError: this ``DropGrad`` is not over :class:`InBackward`.
            ValueError: ``param`` is not one of its parameters.
        """
        self._require_in_backward("mask_parameter()")
        index = self._position_of(param)
        self._masks_in_step += 1
        if not self._backend_checked:
            self.check_backend()
        if not self.may_mask(index):
            return
        targets = self._targets_of([(index, local_target(param, self._table.name_of(index)))])
        if not targets or not self._grads(targets):
            return
        with torch.no_grad():
            if self.full_update_drop and index not in self._pending:
                self._pending[index] = self._snapshot_dropped(targets, mask=True)
            else:
                self._mask(targets)

    @contextlib.contextmanager
    def parameter_step(self, param: torch.Tensor) -> Iterator[None]:
        """Step one parameter's optimizer inside this context: its gradient is masked on
        entry (:meth:`mask_parameter`), and with ``full_update_drop`` its dropped values are
        put back on exit.

        The per-parameter hook of a layer-wise optimizer::

            def hook(p):
                with dropgrad.parameter_step(p):
                    optimizers[p].step()
                optimizers[p].zero_grad()
        """
        self.mask_parameter(param)
        try:
            yield
        finally:
            restore = self._pending.pop(self._position_of(param), None)
            if restore is not None:
                restore.restore()

    def register_mask_hooks(self) -> list[RemovableHandle]:
        """Mask each gradient as ``backward()`` accumulates it: a post-accumulate-grad hook
        calling :meth:`mask_parameter` on every parameter that may be masked.

        For optimizers that read the gradients in later hooks of the same ``backward()``
        (LOMO, AdaLomo: the hook of a parameter runs as soon as its gradient is accumulated,
        before any later hook). Register before the first ``backward()``, and call
        :meth:`step` after each optimizer step's ``backward()``. Returns the hooks' handles.
        """
        self._require_in_backward("register_mask_hooks()")
        return [
            p.register_post_accumulate_grad_hook(self.mask_parameter)
            for index, p in enumerate(self._all_params())
            if p.requires_grad and self.may_mask(index)
        ]

    def _end_step_in_backward(self, closure: Callable[[], Any] | None) -> Any:
        """:meth:`step` over :class:`InBackward`: the updates ran inside ``backward()``; put
        back full update drop's values, check the masking was wired, count the step."""
        loss = self.optimizer.step(closure)
        pending, self._pending = self._pending, {}
        for restore in pending.values():
            restore.restore()
        if not self._wiring_checked:
            if self._masks_in_step == 0 and any(map(self.may_mask, range(self.num_params))):
                raise RuntimeError(
                    "DropGrad over InBackward ended an optimizer step in which no gradient was "
                    "masked: nothing called parameter_step() or mask_parameter() (or the hooks "
                    "of register_mask_hooks()) since the last step, so the optimizers updated "
                    "the parameters from unmasked gradients. Mask inside the hooks that step "
                    "them (see hf_dropgrad.in_backward)."
                )
            self._wiring_checked = True
        self._masks_in_step = 0
        self.advance()
        return loss

    # -- pass-through ----------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its parameters get the default rate."""
        self.optimizer.add_param_group(param_group)
        self._positions = None
        try:
            _refuse_duplicates(self.optimizer.param_groups)
        except ValueError:
            self.optimizer.param_groups.pop()
            raise
        added = self.optimizer.param_groups[-1]
        self._table.add_positions(len(added["params"]), added.get("param_names", ()))

    def train(self) -> None:
        """Call the inner optimizer's ``train()`` where it has one (schedule-free optimizers)."""
        fn = getattr(self.optimizer, "train", None)
        if callable(fn):
            fn()

    def eval(self) -> None:
        """Call the inner optimizer's ``eval()`` where it has one (schedule-free optimizers)."""
        fn = getattr(self.optimizer, "eval", None)
        if callable(fn):
            fn()

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"dropgrad"`` entry with DropGrad's own.

        Only plain numbers and dicts are added, so ``torch.load(weights_only=True)`` loads it.
        """
        state = self.optimizer.state_dict()
        sched = self.drop_rate_scheduler
        state[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "step": self._step_count_dropgrad,
            "seed": self.seed,
            "scheduler": None if sched is None else sched.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state from :meth:`state_dict` or a plain inner-optimizer state dict."""
        state = dict(state_dict)
        own = state.pop(_STATE_KEY, None)
        self.optimizer.load_state_dict(state)
        if own is None:
            return
        self._step_count_dropgrad = int(own["step"])
        self.seed = int(own["seed"])
        if own.get("scheduler") is not None and self.drop_rate_scheduler is not None:
            self.drop_rate_scheduler.load_state_dict(own["scheduler"])

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_backend_checked", False)  # pickled before the check existed
        state.setdefault("_in_backward", isinstance(state.get("optimizer"), InBackward))
        state.setdefault("_pending", {})
        state.setdefault("_masks_in_step", 0)
        state.setdefault("_wiring_checked", False)
        state.setdefault("_positions", None)
        self.__dict__.update(state)

    def __repr__(self) -> str:
        rates = sorted({row.rate for row in self._table.rows() if row.rate is not None})
        shown = ", ".join(f"{r:g}" for r in rates[:6]) + (", ..." if len(rates) > 6 else "")
        return (
            f"DropGrad(rates=[{shown}], full_update_drop={self.full_update_drop}, "
            f"step={self._step_count_dropgrad},\n  {self.optimizer!r})"
        )


def _refuse_updates_outside_step(optimizer: Optimizer) -> None:
    """A ``TypeError`` for an optimizer known to update the parameters outside ``step()``:
    wrapped plainly, its updates would read unmasked gradients while DropGrad reports rates."""
    name = type(optimizer).__name__
    if callable(getattr(optimizer, "fused_backward", None)):
        raise TypeError(
            f"{name} updates the parameters inside fused_backward(), during backward(), before "
            "any step() in which DropGrad could mask the gradients. Build "
            "DropGrad(InBackward(optimizer), ...) and call its register_mask_hooks() before the "
            f"first backward: each gradient is then masked as it is accumulated, before {name} "
            "reads it (DropGradTrainer and DropGradCallback do this for --optim lomo/adalomo)."
        )
    if isinstance(getattr(optimizer, "optimizer_dict", None), Mapping):
        raise TypeError(
            f"{name}.step() does nothing: the optimizers in its optimizer_dict step each "
            "parameter in a gradient hook during backward() (transformers' *_layerwise "
            "optimizers). Build DropGrad(InBackward(optimizer.optimizer_dict), ...) and step "
            "each parameter inside `with dropgrad.parameter_step(p):` in those hooks "
            "(DropGradTrainer and DropGradCallback do this for --optim *_layerwise)."
        )
    defaults = getattr(optimizer, "defaults", None)
    if isinstance(defaults, Mapping) and defaults.get("gradient_release"):
        raise TypeError(
            f"{name} was built with gradient_release=True: it steps each parameter in a "
            "gradient hook during backward(), before any step() in which DropGrad could mask "
            "the gradients. Build it without gradient_release, or build "
            "DropGrad(InBackward(optimizer), ...) and run the per-parameter step inside "
            "`with dropgrad.parameter_step(p):` in your own hooks."
        )


def _requires_grad(boxes: Sequence[Box]) -> bool:
    return any(box.tensor.requires_grad for box in boxes)


def _in_graph(t: MaskTarget) -> bool:
    """Whether full update drop must restore ``t`` through autograd: a plain parameter whose
    gradient requires grad, or that is itself a non-leaf requiring grad."""
    if not isinstance(t.local, Whole):
        boxes = t.local.grads()
        if boxes is not None and _requires_grad(boxes):
            _mask_out_of_place(t)  # raises: sharded
        return False
    param, grad = t.local.param, t.local.param.grad
    return (grad is not None and grad.requires_grad) or (param.requires_grad and not param.is_leaf)


def _mask_out_of_place(t: MaskTarget) -> None:
    """Replace the gradient of ``t``'s parameter by its masked copy, through autograd
    (:func:`~hf_dropgrad.functional.masked`): the caller's gradient, an autograd graph's
    tensor, is not overwritten, and the derivative carries the mask and the scale."""
    if not isinstance(t.local, Whole):
        label = f"parameter {t.name}" if isinstance(t.name, int) else t.name
        raise RuntimeError(
            f"the gradient of {label} requires grad (differentiable=True), and the parameter is "
            "sharded: DropGrad masks gradients through autograd for plain parameters only"
        )
    param = t.local.param
    with torch.enable_grad():
        param.grad = F.masked(param.grad, t.key, t.threshold, t.scale)


class _Restore:
    """What full update drop puts back after a step: the dropped values saved in place, and
    for parameters in an autograd graph their values before the step, restored through
    autograd (``where(keep, after, before)``) when the step recorded a graph."""

    __slots__ = ("graph", "values")

    def __init__(
        self,
        values: F.DroppedValues | None,
        graph: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> None:
        self.values = values
        self.graph = graph

    def restore(self) -> None:
        if self.values is not None:
            with torch.no_grad():
                self.values.restore()
        for param, keep, before in self.graph:
            with torch.set_grad_enabled(param.grad_fn is not None):
                param.copy_(torch.where(keep, param, before))


def _refuse_duplicates(param_groups: list[dict[str, Any]]) -> None:
    """A ``ValueError`` if a tensor is in the groups twice: DropGrad would mask it twice a step
    (two keys, so the wrong rate; on a GPU, two writes to it in one launch)."""
    seen: dict[int, int] = {}
    position = 0
    for group in param_groups:
        names = group.get("param_names") or ()
        for i, p in enumerate(group["params"]):
            first = seen.setdefault(id(p), position)
            if first != position:
                name = f" ({names[i]!r})" if i < len(names) else ""
                raise ValueError(
                    f"the optimizer holds the same parameter twice, at positions {first} and "
                    f"{position}{name}: DropGrad would mask it twice per step, with two masks. "
                    "Pass each parameter once (e.g. list(model.parameters()), which skips tied "
                    "duplicates)."
                )
            position += 1


def get_dropgrad(obj: Any) -> DropGrad | None:
    """Find the :class:`DropGrad` inside ``obj``.

    ``obj`` may be a ``DropGrad``, a ``Trainer`` (its ``.optimizer``), Accelerate's
    ``AcceleratedOptimizer`` or any chain of wrappers exposing ``.optimizer``.
    An optimizer that updates inside ``backward()`` and is served from outside the chain
    (the Trainer layer's ``--optim lomo`` and ``*_layerwise``: see
    :func:`hf_dropgrad.in_backward.mark_served`) gives the ``DropGrad`` that serves it.
    Returns ``None`` when there is none.
    """
    for o in optimizer_chain(obj):
        if isinstance(o, DropGrad):
            return o
        served = served_by(o)
        if isinstance(served, DropGrad):
            return served
    return None


def optimizer_chain(obj: Any) -> Iterator[Any]:
    """``obj``, ``obj.optimizer``, ``obj.optimizer.optimizer``, ... (each object once)."""
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        yield obj
        seen.add(id(obj))
        obj = getattr(obj, "optimizer", None)




def _lists(
    items: Sequence[tuple[MaskTarget, Sequence[Box]]], with_scales: bool = False
) -> tuple[list, ...]:
    """The per-box lists ``functional`` takes: tensors, keys, thresholds, (scales,) offsets, runs
    and strides."""
    flat = [(t, box) for t, boxes in items for box in boxes]
    places = [box.place for _, box in flat]
    lists = [[box.tensor for _, box in flat], [t.key for t, _ in flat],
             [t.threshold for t, _ in flat]]
    if with_scales:
        lists.append([t.scale for t, _ in flat])
    return (*lists, [p[0] for p in places], [p[1] for p in places], [p[2] for p in places])


def _save(items: Sequence[tuple[MaskTarget, Sequence[Box]]]) -> F.DroppedValues:
    """:func:`~hf_dropgrad.functional.save_dropped_many` of the boxes."""
    tensors, keys, thresholds, offsets, runs, strides = _lists(items)
    return F.save_dropped_many(tensors, keys, thresholds, offsets, runs=runs, strides=strides)

"""``DropGrad``: gradient dropout as an optimizer wrapper."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from hf_dropgrad import functional as F
from hf_dropgrad import kernels, sharding
from hf_dropgrad.schedulers import DropRateScheduler, check_rate

__all__ = ["SEED_LIMIT", "DropGrad", "get_dropgrad", "optimizer_chain"]

_STATE_KEY = "dropgrad"
_STATE_VERSION = 1
#: Seeds are ints in ``[0, SEED_LIMIT)``: the masks' stream is keyed by 64 bits.
SEED_LIMIT = 2**64


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
        # An unknown HF_DROPGRAD_BACKEND, or a forced one that cannot run here, fails now.
        kernels.check_forced_backend()
        if seed is None:
            seed = torch.initial_seed()
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        elif not 0 <= seed < SEED_LIMIT:
            raise ValueError(
                f"seed must be an int in [0, 2**64) (the key of the masks' stream), got {seed!r}"
            )

        self.optimizer = optimizer
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._patch_step_function()

        self.seed = seed
        self.full_update_drop = full_update_drop
        self.drop_rate_scheduler = drop_rate_scheduler
        self._step_count_dropgrad = 0
        # Rates, names and patterns are keyed by parameter *position*, never by tensor object:
        # Accelerate's FSDP2 preparation and DeepSpeed replace the tensors in param_groups.
        self._layout: sharding.ZeroLayout | None = None
        self._num_params = sum(len(group["params"]) for group in optimizer.param_groups)
        names = self._parameter_names(model)
        self._base_drop_rate = None if drop_rate is None else check_rate(drop_rate, "drop_rate")
        rates, patterns = self._resolve_params(params, model, names)
        position = self._positions()
        self._names: dict[int, str] = {position[p]: n for p, n in names.items() if p in position}
        self._rates: dict[int, float] = {position[p]: r for p, r in rates.items()}
        self._patterns: dict[int, str] = {position[p]: s for p, s in patterns.items()}

        if drop_rate is None and not self._rates and drop_rate_scheduler is None:
            raise ValueError(
                "DropGrad needs drop_rate (a float in [0, 1]), params ({parameter or name "
                "pattern: rate}) or drop_rate_scheduler"
            )
        if drop_rate_scheduler is not None:
            initial = drop_rate_scheduler.rate_at(0)
            if self._rates and initial == 0.0:
                raise ValueError(
                    "drop_rate_scheduler starts at 0 but per-parameter rates were given: the "
                    "schedule scales each parameter's rate by r(k) / r(0), which is undefined "
                    "for r(0) = 0. Start the schedule above 0, or drop params= and let the "
                    "schedule set every parameter's rate."
                )
            if not self._rates and drop_rate is not None and drop_rate != initial:
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
    def drop_rate(self) -> float | None:
        """The default rate at the current step (scheduled when a scheduler is set)."""
        if self.drop_rate_scheduler is not None and not self._rates:
            return self.drop_rate_scheduler.get_last_rate()
        if self._base_drop_rate is None:
            return None
        return min(1.0, self._base_drop_rate * self._schedule_factor())

    @drop_rate.setter
    def drop_rate(self, value: float | None) -> None:
        if self.drop_rate_scheduler is not None and not self._rates:
            raise ValueError(
                "drop_rate is set by drop_rate_scheduler; change the scheduler instead"
            )
        self._base_drop_rate = None if value is None else check_rate(value, "drop_rate")

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

    # -- rates ---------------------------------------------------------------------------------

    def _all_params(self) -> Iterator[torch.Tensor]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    def _positions(self) -> dict[torch.Tensor, int]:
        """``{parameter: position}`` over the inner optimizer's groups, in order."""
        return {p: i for i, p in enumerate(self._all_params())}

    def _parameter_names(self, model: torch.nn.Module | None) -> dict[torch.Tensor, str]:
        names: dict[torch.Tensor, str] = {}
        if model is not None:
            for name, p in model.named_parameters():
                names.setdefault(p, name)
            return names
        for group in self.optimizer.param_groups:
            for name, p in zip(group.get("param_names", ()), group["params"]):
                names.setdefault(p, name)
        return names

    def _named_for_patterns(self, model: torch.nn.Module | None) -> list[tuple[str, torch.Tensor]]:
        if model is not None:
            # remove_duplicate=False lists tied parameters under every alias. Parameters the
            # optimizer does not own are kept so a pattern naming only them says so.
            return list(model.named_parameters(remove_duplicate=False))
        named = []
        for group in self.optimizer.param_groups:
            if "param_names" not in group:
                raise ValueError(
                    "params has name patterns but DropGrad cannot see parameter names: pass "
                    "model=<your model>, or build the optimizer from model.named_parameters() "
                    "(torch >= 2.6 then keeps param_groups[i]['param_names'])"
                )
            named.extend(zip(group["param_names"], group["params"]))
        return named

    def _resolve_params(
        self,
        params: Mapping[Any, float] | None,
        model: torch.nn.Module | None,
        names: dict[torch.Tensor, str],
    ) -> tuple[dict[torch.Tensor, float], dict[torch.Tensor, str]]:
        rates: dict[torch.Tensor, float] = {}
        patterns: dict[torch.Tensor, str] = {}
        if params is None:
            return rates, patterns
        if not isinstance(params, Mapping):
            raise TypeError(
                "params must be a mapping {parameter: rate} or {name pattern: rate}, "
                f"got {type(params).__name__}"
            )
        owned = set(self._all_params())
        by_pattern: dict[str, float] = {}
        for key, value in params.items():
            if isinstance(key, str):
                by_pattern[key] = check_rate(value, f"params[{key!r}]")
            elif isinstance(key, torch.Tensor):
                if key not in owned:
                    raise ValueError(
                        f"params has a tensor of shape {tuple(key.shape)} that is not a "
                        "parameter of the wrapped optimizer"
                    )
                rates[key] = check_rate(value, f"params[<parameter {tuple(key.shape)}>]")
            else:
                raise TypeError(
                    "params keys must be parameters (torch.nn.Parameter) or name patterns "
                    f"(str), got {type(key).__name__}"
                )
        if by_pattern:
            from hf_dropgrad.patterns import resolve_pattern_rates

            resolved = resolve_pattern_rates(
                self._named_for_patterns(model), by_pattern, trained=owned
            )
            for p, (rate, name, pattern) in resolved.items():
                names.setdefault(p, name)
                if p not in rates:  # an explicit Parameter key beats any pattern
                    rates[p] = rate
                    patterns[p] = pattern
        return rates, patterns

    def name_parameters(self, model: torch.nn.Module) -> None:
        """Name the parameters that have no name yet after ``model``'s ``named_parameters()``.

        For a ``DropGrad`` built without ``model=`` from ``model.parameters()``: afterwards
        :meth:`current_rates`, :meth:`describe` and the Trainer's logs use names, not positions.
        """
        position = self._positions()
        for name, p in model.named_parameters():
            if p in position:
                self._names.setdefault(position[p], name)

    def _schedule_factor(self) -> float:
        sched = self.drop_rate_scheduler
        if sched is None:
            return 1.0
        return sched.get_last_rate() / sched.rate_at(0)

    def _rate_of(self, index: int) -> float | None:
        sched = self.drop_rate_scheduler
        if sched is not None and not self._rates:
            return sched.get_last_rate()
        base = self._rates.get(index, self._base_drop_rate)
        if base is None:
            return None
        return min(1.0, base * self._schedule_factor())

    def current_rates(self) -> dict[str | int, float]:
        """``{parameter name (or position when unnamed): rate}`` for the next step.

        Parameters with no rate are left out; an explicit ``0.0`` is listed.
        """
        out: dict[str | int, float] = {}
        for index in range(self._num_params):
            rate = self._rate_of(index)
            if rate is not None:
                out[self._names.get(index, index)] = rate
        return out

    def rate_groups(self) -> dict[str, float]:
        """Current rate by where it came from: ``{"default": r}`` for ``drop_rate``, the pattern
        for name-pattern rates, ``"params"`` for ``{parameter: rate}`` entries (their largest
        rate). What the Trainer layer logs.
        """
        out: dict[str, float] = {}
        for index in range(self._num_params):
            rate = self._rate_of(index)
            if rate is None:
                continue
            label = self._patterns.get(index) or ("params" if index in self._rates else "default")
            out[label] = max(rate, out.get(label, 0.0))
        return out

    def describe(self) -> str:
        """A table of which parameters got which rate (printed by the Trainer layer)."""
        from hf_dropgrad.patterns import format_rate_table

        rows = []
        for index in range(self._num_params):
            name = self._names.get(index, str(index))
            rows.append((name, self._rate_of(index), self._patterns.get(index)))
        return format_rate_table(rows)

    # -- the step ------------------------------------------------------------------------------

    def _pieces(self) -> Iterator[tuple[int, Any]]:
        """``(position, target)`` of what this process masks: a parameter, or a
        :class:`~hf_dropgrad.sharding.Piece` of one (its local shard at a global offset)."""
        if self._layout is not None:
            yield from self._layout.pieces(self.optimizer.param_groups)
            return
        params = list(self._all_params())
        if len(params) != self._num_params:
            # Positions key the masks: with other tensors in param_groups they would be wrong.
            raise RuntimeError(
                f"DropGrad was built over {self._num_params} parameters but its optimizer now "
                f"holds {len(params)} tensors. An engine replaced them (DeepSpeed ZeRO steps "
                "flat partitions): the Trainer handles that; in your own DeepSpeed loop call "
                "hf_dropgrad.engines.attach_deepspeed(engine.optimizer) after "
                "deepspeed.initialize. To add parameters, use DropGrad.add_param_group."
            )
        for index, p in enumerate(params):
            yield index, sharding.local_target(p)

    def _set_layout(self, layout: sharding.ZeroLayout | None) -> None:
        """Mask the ranges ``layout`` maps (DeepSpeed ZeRO's flat partitions), and leave
        advancing the step count to the engine (it calls :meth:`step` once per group)."""
        self._layout = layout

    def _advance(self) -> None:
        """One optimizer step is done: advance the step count and the scheduler."""
        self._step_count_dropgrad += 1
        if self.drop_rate_scheduler is not None:
            self.drop_rate_scheduler.step()

    def _targets(self) -> list[tuple[Any, int, int, float]]:
        """``(target, key, threshold, scale)`` of every parameter (or local piece of one) with a
        positive rate; ``target.grad`` is what gets masked."""
        out = []
        for index, target in self._pieces():
            rate = self._rate_of(index)
            if not rate:
                continue
            threshold = F.drop_threshold(rate)
            if threshold == 0:
                continue
            key = F.derive_key(self.seed, self._step_count_dropgrad, index)
            out.append((target, key, threshold, F.keep_scale(threshold)))
        return out

    @staticmethod
    def _check_grad(p: torch.Tensor) -> None:
        grad = p.grad
        assert grad is not None
        if grad.is_sparse:
            raise RuntimeError(
                "DropGrad does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                "use dense gradients or leave that parameter without a rate"
            )
        if type(grad).__name__ == "DTensor":
            # DTensor parameters are masked through their local shard (hf_dropgrad.sharding);
            # a DTensor gradient on a plain parameter has no known place in the parameter.
            raise RuntimeError(
                "DropGrad got a sharded (DTensor) gradient for a parameter that is not a "
                "DTensor, so it cannot tell where the shard sits in the full parameter. Shard "
                "parameters with FSDP2 (fully_shard), which DropGrad masks exactly."
            )
        if not grad.is_floating_point():
            raise TypeError(f"DropGrad can only mask floating-point gradients, got {grad.dtype}")

    def _live(
        self, targets: list[tuple[torch.Tensor, int, int, float]]
    ) -> list[tuple[torch.Tensor, int, int, float]]:
        """The targets that have a gradient, each checked by :meth:`_check_grad`."""
        live = [t for t in targets if t[0].grad is not None]
        for p, *_ in live:
            self._check_grad(p)
        return live

    def _mask(self, targets: list[tuple[torch.Tensor, int, int, float]]) -> None:
        live = self._live(targets)
        F.mask_(
            [p.grad for p, *_ in live],  # type: ignore[misc]
            [t[1] for t in live],
            [t[2] for t in live],
            [t[3] for t in live],
            [sharding.offset_of(t[0]) for t in live],
        )

    def _snapshot_dropped(
        self, targets: list[tuple[torch.Tensor, int, int, float]], mask: bool = False
    ) -> F.DroppedValues:
        """Save the parameters' dropped values; with ``mask``, mask the gradients too (one
        hashing pass fewer: the mask counts what the save packs)."""
        params = [t.data if isinstance(t, sharding.Piece) else t.detach() for t, *_ in targets]
        if mask:
            return F.mask_and_save_dropped_many(
                [t[0].grad for t in targets],  # type: ignore[misc]
                params,
                [t[1] for t in targets],
                [t[2] for t in targets],
                [t[3] for t in targets],
                [sharding.offset_of(t[0]) for t in targets],
            )
        return F.save_dropped_many(
            params,
            [t[1] for t in targets],
            [t[2] for t in targets],
            [sharding.offset_of(t[0]) for t in targets],
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Mask the gradients, then take the inner optimizer's step.

        Args:
            closure: re-evaluates the model and returns the loss; its gradients are masked
                (with this step's mask) each time the inner optimizer calls it.
        """
        targets = self._targets()
        saved = None
        if self.full_update_drop and targets:
            self._live(targets)  # refuse bad gradients before touching parameters
            with torch.no_grad():
                # Without a closure only parameters that have a gradient can move.
                live = [t for t in targets if closure is not None or t[0].grad is not None]
                saved = self._snapshot_dropped(live, mask=closure is None)
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
            with torch.no_grad():
                saved.restore()
        if self._layout is None:  # under ZeRO the engine's step advances it, once for all groups
            self._advance()
        return loss

    # -- pass-through ----------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its parameters get the default rate."""
        self.optimizer.add_param_group(param_group)
        added = self.optimizer.param_groups[-1]
        for offset, name in enumerate(added.get("param_names", ())):
            self._names.setdefault(self._num_params + offset, name)
        self._num_params += len(added["params"])

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
        self.__dict__.update(state)

    def __repr__(self) -> str:
        rates = sorted({r for r in map(self._rate_of, range(self._num_params)) if r is not None})
        shown = ", ".join(f"{r:g}" for r in rates[:6]) + (", ..." if len(rates) > 6 else "")
        return (
            f"DropGrad(rates=[{shown}], full_update_drop={self.full_update_drop}, "
            f"step={self._step_count_dropgrad},\n  {self.optimizer!r})"
        )


def get_dropgrad(obj: Any) -> DropGrad | None:
    """Find the :class:`DropGrad` inside ``obj``.

    ``obj`` may be a ``DropGrad``, a ``Trainer`` (its ``.optimizer``), Accelerate's
    ``AcceleratedOptimizer`` or any chain of wrappers exposing ``.optimizer``.
    Returns ``None`` when there is none.
    """
    return next((o for o in optimizer_chain(obj) if isinstance(o, DropGrad)), None)


def optimizer_chain(obj: Any) -> Iterator[Any]:
    """``obj``, ``obj.optimizer``, ``obj.optimizer.optimizer``, ... (each object once)."""
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        yield obj
        seen.add(id(obj))
        obj = getattr(obj, "optimizer", None)



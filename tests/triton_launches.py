"""What a call into the Triton backend launches and reads back, observed from the outside.

* kernel launches: a pre-run hook on each ``@triton.jit`` kernel of the backend (Triton calls it
  on every launch, compiled or interpreted), matched against ``VARIANTS`` by kernel and
  compile-time arguments, so a launch that bypassed the registry would show up as unknown;
* torch work: every aten op the call dispatches (a ``TorchDispatchMode``);
* host read-backs: ``aten._local_scalar_dense`` (what ``.item()``, ``int(t)``, ``float(t)`` and
  ``bool(t)`` dispatch to) and copies of a device tensor to the CPU, plus calls of
  ``torch.cuda.synchronize`` and of ``Stream``/``Event.synchronize``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class Observed:
    variants: list[str] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)
    readbacks: int = 0
    synchronize_calls: int = 0

    @property
    def launches(self) -> int:
        return len(self.variants)


class _Ops(TorchDispatchMode):
    def __init__(self, seen: Observed) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.seen.ops[name] += 1
        if name.startswith("aten._local_scalar_dense"):
            self.seen.readbacks += 1
        elif name.startswith(("aten._to_copy", "aten.copy_")):
            src = args[1] if name.startswith("aten.copy_") else args[0]
            dst_cpu = (
                args[0].device.type == "cpu"
                if name.startswith("aten.copy_")
                else torch.device(kwargs.get("device") or src.device).type == "cpu"
            )
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_cpu:
                self.seen.readbacks += 1
        return func(*args, **kwargs)


def _variant_of(module: Any, kernel: Any, kwargs: dict[str, Any]) -> str:
    for variant in module.VARIANTS.values():
        if variant.kernel is kernel and all(
            kwargs.get(k) == v for k, v in variant.constexprs.items()
        ):
            return variant.name
    return f"unknown:{kernel.fn.__name__}:{sorted(kwargs)}"


@contextlib.contextmanager
def observe(module: Any) -> Iterator[Observed]:
    """Record the launches, aten ops and read-backs of the ``with`` block (backend ``module``)."""
    seen = Observed()
    kernels = {id(v.kernel): v.kernel for v in module.VARIANTS.values()}.values()
    hooks = []
    for kernel in kernels:
        def hook(*args: Any, _kernel: Any = kernel, **kwargs: Any) -> None:
            seen.variants.append(_variant_of(module, _kernel, kwargs))

        kernel.add_pre_run_hook(hook)
        hooks.append((kernel, hook))
    originals = {
        (torch.cuda, "synchronize"): torch.cuda.synchronize,
        (torch.cuda.Stream, "synchronize"): torch.cuda.Stream.synchronize,
        (torch.cuda.Event, "synchronize"): torch.cuda.Event.synchronize,
    }

    def counting(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen.synchronize_calls += 1
            return original(*args, **kwargs)

        return wrapper

    for (owner, name), original in originals.items():
        setattr(owner, name, counting(original))
    try:
        with _Ops(seen):
            yield seen
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)

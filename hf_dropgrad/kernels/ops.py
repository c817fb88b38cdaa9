"""The masking kernels as ``torch.library`` ops in the namespace ``hf_dropgrad``.

=======================================  ===================================================
op                                       what it does
=======================================  ===================================================
``mask_(grads, keys, thresholds,         masks every gradient of the list in place
scales, offsets, runs, strides)``
``keep_mask_(out, key, threshold,        fills a bool tensor with the keep decisions
offset)``
``gather_dropped_many(tensors, keys,     full update drop's save: ``(values, starts)``
thresholds, offsets, runs, strides)``
``scatter_dropped_many(tensors, ...,     full update drop's restore, in place
runs, strides, values, starts)``
``mask_counted_(grads, ..., runs,        ``mask_``, and fills ``starts`` with the chunk starts
strides, starts)``                       ``gather_dropped_many`` would return for tensors of
                                         the grads' sizes (counted from the mask's hashes)
``gather_dropped_at(tensors, ...,        ``gather_dropped_many``'s ``values``, the starts
runs, strides, starts)``                 given (full update drop's save, no counting pass)
``mask_gather_dropped_(grads, tensors,   ``mask_`` of the grads and ``gather_dropped_many`` of
keys, thresholds, scales, offsets,       the tensors in one pass: ``(values, starts)``
runs, strides)``
=======================================  ===================================================

Their arguments are the backend protocol's (:mod:`hf_dropgrad.kernels.protocol`): this module's
Python functions are that protocol, so :func:`hf_dropgrad.kernels.choose` hands this module out
as the plan of a tensor whose device's own implementation is the chosen backend. The last three
ops let full update drop hash the stream fewer times per step: the parameters' dropped elements
are exactly the gradients' (same keys, thresholds, offsets, runs and sizes).

The schemas are defined here, so the ops exist whatever is installed. The device of the tensors
picks the implementation, as for any torch op:

* **CPU**: the C++ kernels of ``csrc/mask_cpu.cpp``, registered by its ``TORCH_LIBRARY_IMPL``
  block when :func:`hf_dropgrad.kernels.cpp.load` loads the library (built on first use); they
  check their own arguments (``TORCH_CHECK_VALUE``: a ``ValueError`` in Python);
* **CUDA**: :mod:`hf_dropgrad.kernels.triton` (the reference if Triton does not import);
* **any other device** (and CPU before or without the C++ library): the pure-torch reference,
  registered as the ``CompositeExplicitAutograd`` kernel.

Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces a call as
one opaque node. Keys are stream keys modulo ``2**64``, passed as int64 bit patterns (the schema
has no unsigned integer); the Python functions below take any int and convert it, and check
the offsets and runs (:mod:`hf_dropgrad.kernels.checks`) the schema cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hf_dropgrad.kernels import loaders, reference
from hf_dropgrad.kernels.checks import check_offset, check_offsets, check_runs, run_chunks
from hf_dropgrad.kernels.stream import signed64

__all__ = [
    "NAMESPACE",
    "gather_dropped_at",
    "gather_dropped_many",
    "keep_mask_",
    "mask_",
    "mask_counted_",
    "mask_gather_dropped_",
    "scatter_dropped_many",
]

NAMESPACE = "hf_dropgrad"

_PLACES = "int[] offsets, int[] runs, int[] strides"

# Kept alive for the life of the process: deleting a Library removes its registrations.
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_lib.define(
    f"mask_(Tensor(a!)[] grads, int[] keys, int[] thresholds, float[] scales, {_PLACES}) -> ()"
)
_lib.define("keep_mask_(Tensor(a!) out, int key, int threshold, int offset) -> ()")
_lib.define(
    f"gather_dropped_many(Tensor[] tensors, int[] keys, int[] thresholds, {_PLACES}) "
    "-> (Tensor, Tensor)"
)
_lib.define(
    f"scatter_dropped_many(Tensor(a!)[] tensors, int[] keys, int[] thresholds, {_PLACES}, "
    "Tensor values, Tensor starts) -> ()"
)
_lib.define(
    f"mask_counted_(Tensor(a!)[] grads, int[] keys, int[] thresholds, float[] scales, "
    f"{_PLACES}, Tensor(b!) starts) -> ()"
)
_lib.define(
    f"gather_dropped_at(Tensor[] tensors, int[] keys, int[] thresholds, {_PLACES}, "
    "Tensor starts) -> Tensor"
)
_lib.define(
    "mask_gather_dropped_(Tensor(a!)[] grads, Tensor[] tensors, int[] keys, int[] thresholds, "
    f"float[] scales, {_PLACES}) -> (Tensor, Tensor)"
)

_ops = torch.ops.hf_dropgrad

TensorList = list[torch.Tensor]
Ints = list[int]


def _keys(keys: Sequence[int]) -> list[int]:
    return [signed64(int(k)) for k in keys]


def _places(
    tensors: Sequence[torch.Tensor],
    offsets: Sequence[int] | None,
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
) -> tuple[Ints, Ints, Ints]:
    offs = check_offsets(offsets, len(tensors))
    rs, ss = check_runs([t.numel() for t in tensors], offs, runs, strides)
    return offs, rs, ss


# ----------------------------------------------------------------------------- the protocol
def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> None:
    """``hf_dropgrad::mask_``: mask every gradient in place (one device per call)."""
    _ops.mask_(
        list(grads), _keys(keys), [int(t) for t in thresholds], [float(s) for s in scales],
        *_places(grads, offsets, runs, strides),
    )


def keep_mask_(out: torch.Tensor, key: int, threshold: int, offset: int) -> None:
    """``hf_dropgrad::keep_mask_``: fill the contiguous bool tensor ``out``."""
    _ops.keep_mask_(out, signed64(int(key)), int(threshold), check_offset(offset))


def gather_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hf_dropgrad::gather_dropped_many``: every tensor's dropped values, and chunk starts."""
    return _ops.gather_dropped_many(
        list(tensors), _keys(keys), [int(t) for t in thresholds],
        *_places(tensors, offsets, runs, strides),
    )


def scatter_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
    values: torch.Tensor,
    starts: torch.Tensor,
) -> None:
    """``hf_dropgrad::scatter_dropped_many``: write the values back into the dropped elements."""
    _ops.scatter_dropped_many(
        list(tensors), _keys(keys), [int(t) for t in thresholds],
        *_places(tensors, offsets, runs, strides), values, starts,
    )


def mask_counted_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
    starts: torch.Tensor,
) -> None:
    """``hf_dropgrad::mask_counted_``: :func:`mask_`, and the dropped elements' chunk starts."""
    _ops.mask_counted_(
        list(grads), _keys(keys), [int(t) for t in thresholds], [float(s) for s in scales],
        *_places(grads, offsets, runs, strides), starts,
    )


def gather_dropped_at(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    runs: Sequence[int] | None,
    strides: Sequence[int] | None,
    starts: torch.Tensor,
) -> torch.Tensor:
    """``hf_dropgrad::gather_dropped_at``: every tensor's dropped values, the starts given."""
    return _ops.gather_dropped_at(
        list(tensors), _keys(keys), [int(t) for t in thresholds],
        *_places(tensors, offsets, runs, strides), starts,
    )


def mask_gather_dropped_(
    grads: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    runs: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hf_dropgrad::mask_gather_dropped_``: :func:`mask_` of ``grads``, and the dropped values
    of ``tensors`` (``tensors[i]`` has ``grads[i]``'s size; they share no memory) with their chunk
    starts, as :func:`gather_dropped_many` returns them."""
    return _ops.mask_gather_dropped_(
        list(grads), list(tensors), _keys(keys), [int(t) for t in thresholds],
        [float(s) for s in scales], *_places(grads, offsets, runs, strides),
    )


# ----------------------------------------------------------------------------- implementations
def _on_cuda(name: str) -> Callable[..., Any]:
    """The CUDA kernel of op ``name``: the Triton backend's function, the reference's if Triton
    does not import."""

    def run(*args: Any) -> Any:
        module = loaders.triton_module()
        return getattr(reference if module is None else module, name)(*args)

    run.__name__ = f"{name}_cuda"
    return run


# The reference is the default kernel (any device, and CPU without the C++ library); CUDA runs
# Triton; the C++ library registers the CPU kernels itself.
_IMPLEMENTED = (
    "mask_", "keep_mask_", "gather_dropped_many", "scatter_dropped_many", "mask_counted_",
    "gather_dropped_at", "mask_gather_dropped_",
)
for _name in _IMPLEMENTED:
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")
    _lib.impl(_name, _on_cuda(_name), "CUDA")


# ----------------------------------------------------------------------------- fake (meta)
def _chunks(tensors: TensorList, offsets: Ints, runs: Ints, strides: Ints) -> int:
    return sum(
        run_chunks(x.numel(), o, r, s) for x, o, r, s in zip(tensors, offsets, runs, strides)
    )


def _values_fake(tensors: TensorList) -> torch.Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = tensors[0].dtype if tensors else torch.float32
    return torch.empty(torch.library.get_ctx().new_dynamic_size(), dtype=dtype, device=device)


def _gather_fake(
    tensors: TensorList, keys: Ints, thresholds: Ints, offsets: Ints, runs: Ints, strides: Ints
) -> tuple[torch.Tensor, torch.Tensor]:
    device = tensors[0].device if tensors else torch.device("cpu")
    total = _chunks(tensors, offsets, runs, strides)
    return _values_fake(tensors), torch.empty(total + 1, dtype=torch.int64, device=device)


def _gather_at_fake(
    tensors: TensorList, keys: Ints, thresholds: Ints, offsets: Ints, runs: Ints, strides: Ints,
    starts: torch.Tensor,
) -> torch.Tensor:
    return _values_fake(tensors)


def _mask_gather_fake(
    grads: TensorList, tensors: TensorList, keys: Ints, thresholds: Ints, scales: list[float],
    offsets: Ints, runs: Ints, strides: Ints,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _gather_fake(tensors, keys, thresholds, offsets, runs, strides)


def _nothing(*args: Any) -> None:
    return None


for _name, _fake in (
    ("mask_", _nothing),
    ("mask_counted_", _nothing),
    ("keep_mask_", _nothing),
    ("scatter_dropped_many", _nothing),
    ("gather_dropped_many", _gather_fake),
    ("gather_dropped_at", _gather_at_fake),
    ("mask_gather_dropped_", _mask_gather_fake),
):
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake, lib=_lib)

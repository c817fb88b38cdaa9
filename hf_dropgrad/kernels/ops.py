"""The masking kernels as ``torch.library`` ops in the namespace ``hf_dropgrad``.

=======================================  ===================================================
op                                       what it does
=======================================  ===================================================
``mask_(grads, keys, thresholds,         masks every gradient of the list in place
scales, offsets)``
``keep_mask_(out, key, threshold,        fills a bool tensor with the keep decisions
offset)``
``gather_dropped_many(tensors, keys,     full update drop's save: ``(values, starts)``
thresholds, offsets)``
``scatter_dropped_many(tensors, keys,    full update drop's restore, in place
thresholds, offsets, values, starts)``
``mask_counted_(grads, keys, thresholds, ``mask_``, and fills ``starts`` with the chunk starts
scales, offsets, starts)``               ``gather_dropped_many`` would return for tensors of
                                         the grads' sizes (counted from the mask's hashes)
``gather_dropped_at(tensors, keys,       ``gather_dropped_many``'s ``values``, the starts
thresholds, offsets, starts)``           given (full update drop's save, no counting pass)
``mask_gather_dropped_(grads, tensors,   ``mask_`` of the grads and ``gather_dropped_many`` of
keys, thresholds, scales, offsets)``     the tensors in one pass: ``(values, starts)``
=======================================  ===================================================

The last three let full update drop hash the stream fewer times per step: the parameters'
dropped elements are exactly the gradients' (same keys, thresholds, offsets and sizes).
``mask_counted_`` counts them while masking, so ``gather_dropped_at`` needs no count pass of its
own (three hashing passes per step with the restore); ``mask_gather_dropped_`` also packs them
from the mask's hashes (two). The C++ kernel implements all three; every other device runs the
reference (Triton's full update drop keeps its own count pass, see
:mod:`hf_dropgrad.kernels.triton`), ``mask_gather_dropped_`` as ``mask_counted_`` then
``gather_dropped_at``.

The schemas are defined here, so the ops exist whatever is installed. The device of the tensors
picks the implementation, as for any torch op:

* **CPU**: the C++ kernels of ``csrc/mask_cpu.cpp``, registered by its ``TORCH_LIBRARY_IMPL``
  block when :func:`hf_dropgrad.kernels.cpp.load` loads the library (built on first use);
* **CUDA**: :mod:`hf_dropgrad.kernels.triton` (the reference if Triton does not import);
* **any other device** (and CPU before or without the C++ library): the pure-torch reference,
  registered as the ``CompositeExplicitAutograd`` kernel.

Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces a call as
one opaque node. Keys are stream keys modulo ``2**64``, passed as int64 bit patterns (the schema
has no unsigned integer); the Python functions below take any int and convert it.
``HF_DROPGRAD_BACKEND`` does not change what an op runs: :func:`hf_dropgrad.kernels.dispatch`
calls the ops when the forced backend is the one the device would take anyway, and the forced
backend's module directly otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from hf_dropgrad.kernels import reference
from hf_dropgrad.kernels.stream import CHUNK, signed64

__all__ = [
    "NAMESPACE",
    "gather_dropped_at",
    "gather_dropped_many",
    "keep_mask_",
    "mask_",
    "mask_counted_",
    "mask_gather_dropped_",
    "num_chunks",
    "scatter_dropped_many",
]

NAMESPACE = "hf_dropgrad"

# Kept alive for the life of the process: deleting a Library removes its registrations.
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_lib.define(
    "mask_(Tensor(a!)[] grads, int[] keys, int[] thresholds, float[] scales, int[] offsets) -> ()"
)
_lib.define("keep_mask_(Tensor(a!) out, int key, int threshold, int offset) -> ()")
_lib.define(
    "gather_dropped_many(Tensor[] tensors, int[] keys, int[] thresholds, int[] offsets) "
    "-> (Tensor, Tensor)"
)
_lib.define(
    "scatter_dropped_many(Tensor(a!)[] tensors, int[] keys, int[] thresholds, int[] offsets, "
    "Tensor values, Tensor starts) -> ()"
)

_lib.define(
    "mask_counted_(Tensor(a!)[] grads, int[] keys, int[] thresholds, float[] scales, "
    "int[] offsets, Tensor(b!) starts) -> ()"
)
_lib.define(
    "gather_dropped_at(Tensor[] tensors, int[] keys, int[] thresholds, int[] offsets, "
    "Tensor starts) -> Tensor"
)
_lib.define(
    "mask_gather_dropped_(Tensor(a!)[] grads, Tensor[] tensors, int[] keys, int[] thresholds, "
    "float[] scales, int[] offsets) -> (Tensor, Tensor)"
)

_ops = torch.ops.hf_dropgrad


def num_chunks(numel: int, offset: int = 0) -> int:
    """Number of 4096-element stream chunks that elements ``offset .. offset + numel - 1`` touch."""
    if numel <= 0:
        return 0
    return (offset + numel - 1) // CHUNK - offset // CHUNK + 1


def _keys(keys: Sequence[int]) -> list[int]:
    return [signed64(int(k)) for k in keys]


# ----------------------------------------------------------------------------- Python entries
def mask_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int] | None = None,
) -> None:
    """``hf_dropgrad::mask_``: mask every gradient in place (one device per call)."""
    offs = [0] * len(grads) if offsets is None else [int(o) for o in offsets]
    _ops.mask_(
        list(grads), _keys(keys), [int(t) for t in thresholds], [float(s) for s in scales], offs
    )


def keep_mask_(out: torch.Tensor, key: int, threshold: int, offset: int = 0) -> torch.Tensor:
    """``hf_dropgrad::keep_mask_``: fill the contiguous bool tensor ``out``; returns it."""
    _ops.keep_mask_(out, signed64(int(key)), int(threshold), int(offset))
    return out


def gather_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hf_dropgrad::gather_dropped_many``: every tensor's dropped values, and chunk starts."""
    return _ops.gather_dropped_many(
        list(tensors), _keys(keys), [int(t) for t in thresholds], [int(o) for o in offsets]
    )


def scatter_dropped_many(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    values: torch.Tensor,
    starts: torch.Tensor,
) -> None:
    """``hf_dropgrad::scatter_dropped_many``: write the values back into the dropped elements."""
    _ops.scatter_dropped_many(
        list(tensors), _keys(keys), [int(t) for t in thresholds], [int(o) for o in offsets],
        values, starts,
    )


def mask_counted_(
    grads: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
    starts: torch.Tensor,
) -> None:
    """``hf_dropgrad::mask_counted_``: :func:`mask_`, and the dropped elements' chunk starts."""
    _ops.mask_counted_(
        list(grads), _keys(keys), [int(t) for t in thresholds], [float(s) for s in scales],
        [int(o) for o in offsets], starts,
    )


def gather_dropped_at(
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    offsets: Sequence[int],
    starts: torch.Tensor,
) -> torch.Tensor:
    """``hf_dropgrad::gather_dropped_at``: every tensor's dropped values, the starts given."""
    return _ops.gather_dropped_at(
        list(tensors), _keys(keys), [int(t) for t in thresholds], [int(o) for o in offsets],
        starts,
    )


def mask_gather_dropped_(
    grads: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    keys: Sequence[int],
    thresholds: Sequence[int],
    scales: Sequence[float],
    offsets: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hf_dropgrad::mask_gather_dropped_``: :func:`mask_` of ``grads``, and the dropped values
    of ``tensors`` (``tensors[i]`` has ``grads[i]``'s size; they share no memory) with their chunk
    starts, as :func:`gather_dropped_many` returns them."""
    return _ops.mask_gather_dropped_(
        list(grads), list(tensors), _keys(keys), [int(t) for t in thresholds],
        [float(s) for s in scales], [int(o) for o in offsets],
    )


# ----------------------------------------------------------------------------- reference (default)
TensorList = list[torch.Tensor]
Ints = list[int]


def _mask_reference(
    grads: TensorList, keys: Ints, thresholds: Ints, scales: list[float], offsets: Ints
) -> None:
    reference.mask_(grads, keys, thresholds, scales, offsets)


def _keep_mask_reference(out: torch.Tensor, key: int, threshold: int, offset: int) -> None:
    reference.keep_mask(out.numel(), key, threshold, out.device, out=out, offset=offset)


def _mask_counted_reference(
    grads: TensorList,
    keys: Ints,
    thresholds: Ints,
    scales: list[float],
    offsets: Ints,
    starts: torch.Tensor,
) -> None:
    # The counts first: masking does not change them, but a gradient may be one of the tensors.
    starts.copy_(reference.chunk_starts(grads, keys, thresholds, offsets))
    reference.mask_(grads, keys, thresholds, scales, offsets)


def _gather_at_reference(
    tensors: TensorList, keys: Ints, thresholds: Ints, offsets: Ints, starts: torch.Tensor
) -> torch.Tensor:
    return reference.gather_dropped_many(tensors, keys, thresholds, offsets)[0]


def _mask_gather_reference(
    grads: TensorList,
    tensors: TensorList,
    keys: Ints,
    thresholds: Ints,
    scales: list[float],
    offsets: Ints,
) -> tuple[torch.Tensor, torch.Tensor]:
    device = grads[0].device if grads else torch.device("cpu")
    chunks = sum(num_chunks(g.numel(), o) for g, o in zip(grads, offsets, strict=True))
    starts = torch.empty(chunks + 1, dtype=torch.int64, device=device)
    _ops.mask_counted_(grads, keys, thresholds, scales, offsets, starts)
    return _ops.gather_dropped_at(tensors, keys, thresholds, offsets, starts), starts


_lib.impl("mask_", _mask_reference, "CompositeExplicitAutograd")
_lib.impl("mask_counted_", _mask_counted_reference, "CompositeExplicitAutograd")
_lib.impl("gather_dropped_at", _gather_at_reference, "CompositeExplicitAutograd")
_lib.impl("mask_gather_dropped_", _mask_gather_reference, "CompositeExplicitAutograd")
_lib.impl("keep_mask_", _keep_mask_reference, "CompositeExplicitAutograd")
_lib.impl("gather_dropped_many", reference.gather_dropped_many, "CompositeExplicitAutograd")
_lib.impl("scatter_dropped_many", reference.scatter_dropped_many, "CompositeExplicitAutograd")


# ----------------------------------------------------------------------------- CUDA (Triton)
def _triton() -> ModuleType | None:
    from hf_dropgrad import kernels

    return kernels.triton_module()


def _mask_cuda(
    grads: TensorList, keys: Ints, thresholds: Ints, scales: list[float], offsets: Ints
) -> None:
    module = _triton()
    if module is None:
        reference.mask_(grads, keys, thresholds, scales, offsets)
    else:
        module.mask_(grads, keys, thresholds, scales, offsets)


def _keep_mask_cuda(out: torch.Tensor, key: int, threshold: int, offset: int) -> None:
    module = _triton()
    if module is None:
        _keep_mask_reference(out, key, threshold, offset)
    else:
        triton_keep_mask_(module, out, key, threshold, offset)


def _gather_cuda(
    tensors: TensorList, keys: Ints, thresholds: Ints, offsets: Ints
) -> tuple[torch.Tensor, torch.Tensor]:
    module = _triton()
    if module is None:
        return reference.gather_dropped_many(tensors, keys, thresholds, offsets)
    return module.gather_dropped_many(tensors, keys, thresholds, offsets)


def _scatter_cuda(
    tensors: TensorList,
    keys: Ints,
    thresholds: Ints,
    offsets: Ints,
    values: torch.Tensor,
    starts: torch.Tensor,
) -> None:
    module = _triton()
    if module is None:
        reference.scatter_dropped_many(tensors, keys, thresholds, offsets, values, starts)
    else:
        module.scatter_dropped_many(tensors, keys, thresholds, offsets, values, starts)


_lib.impl("mask_", _mask_cuda, "CUDA")
_lib.impl("keep_mask_", _keep_mask_cuda, "CUDA")
_lib.impl("gather_dropped_many", _gather_cuda, "CUDA")
_lib.impl("scatter_dropped_many", _scatter_cuda, "CUDA")


def triton_keep_mask_(
    module: ModuleType, out: torch.Tensor, key: int, threshold: int, offset: int = 0
) -> torch.Tensor:
    """Keep decisions through the Triton mask kernel (Triton has no keep-mask kernel of its own).

    Masks a bfloat16 tensor of ones with scale 1: kept elements stay 1, dropped ones become 0
    (2 bytes per element of temporary).
    """
    ones = torch.ones(out.numel(), dtype=torch.bfloat16, device=out.device)
    if threshold > 0:
        module.mask_([ones], [key], [threshold], [1.0], [offset])
    torch.ne(ones, 0, out=out.view(-1))
    return out


# ----------------------------------------------------------------------------- fake (meta)
def _mask_fake(
    grads: TensorList, keys: Ints, thresholds: Ints, scales: list[float], offsets: Ints
) -> None:
    return None


def _keep_mask_fake(out: torch.Tensor, key: int, threshold: int, offset: int) -> None:
    return None


def _gather_fake(
    tensors: TensorList, keys: Ints, thresholds: Ints, offsets: Ints
) -> tuple[torch.Tensor, torch.Tensor]:
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = tensors[0].dtype if tensors else torch.float32
    total = sum(num_chunks(x.numel(), o) for x, o in zip(tensors, offsets, strict=True))
    values = torch.empty(torch.library.get_ctx().new_dynamic_size(), dtype=dtype, device=device)
    return values, torch.empty(total + 1, dtype=torch.int64, device=device)


def _scatter_fake(
    tensors: TensorList,
    keys: Ints,
    thresholds: Ints,
    offsets: Ints,
    values: torch.Tensor,
    starts: torch.Tensor,
) -> None:
    return None


def _mask_counted_fake(
    grads: TensorList,
    keys: Ints,
    thresholds: Ints,
    scales: list[float],
    offsets: Ints,
    starts: torch.Tensor,
) -> None:
    return None


def _gather_at_fake(
    tensors: TensorList, keys: Ints, thresholds: Ints, offsets: Ints, starts: torch.Tensor
) -> torch.Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = tensors[0].dtype if tensors else torch.float32
    return torch.empty(torch.library.get_ctx().new_dynamic_size(), dtype=dtype, device=device)


def _mask_gather_fake(
    grads: TensorList,
    tensors: TensorList,
    keys: Ints,
    thresholds: Ints,
    scales: list[float],
    offsets: Ints,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _gather_fake(tensors, keys, thresholds, offsets)


for _name, _fake in (
    ("mask_", _mask_fake),
    ("mask_gather_dropped_", _mask_gather_fake),
    ("mask_counted_", _mask_counted_fake),
    ("gather_dropped_at", _gather_at_fake),
    ("keep_mask_", _keep_mask_fake),
    ("gather_dropped_many", _gather_fake),
    ("scatter_dropped_many", _scatter_fake),
):
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake, lib=_lib)

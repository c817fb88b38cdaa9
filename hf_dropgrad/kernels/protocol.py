"""The backend protocol: what every masking backend offers, and the plan that names one.

Every backend module (:mod:`~hf_dropgrad.kernels.ops`, whose ``torch.library`` ops run the C++
kernel on CPU and Triton on CUDA; :mod:`~hf_dropgrad.kernels.triton` called directly;
:mod:`~hf_dropgrad.kernels.reference`) has the functions of :class:`Backend`, with the same
signatures and the same returns, as torch.optim's ``_single_tensor_adamw`` /
``_multi_tensor_adamw`` / ``_fused_adamw`` do. :func:`hf_dropgrad.kernels.choose` returns a
:class:`Plan` (which backend takes a tensor, the module to call, what it can do); callers call
``plan.ops.<function>`` and never name a backend.

Arguments, for a list of ``n`` tensors (one entry each):

* ``keys``: stream keys, ints taken modulo ``2**64``;
* ``thresholds``: drop thresholds in ``[0, 65536]`` (an element whose 16 bits are below it is
  dropped);
* ``scales``: the factor of kept elements, rounded to float32 (float64 gradients: float64);
* ``offsets``, ``runs``, ``strides``: where each tensor's elements sit in the stream
  (:mod:`hf_dropgrad.kernels.checks`): ``runs[i]`` elements per run, run ``r`` at stream index
  ``offsets[i] + r * strides[i]``; ``runs[i] == numel`` is one contiguous run;
* ``starts``: full update drop's chunk starts (int64, one per chunk of the tensors, numbered
  run by run, plus the total), as :meth:`Backend.gather_dropped_many` returns them.

Tensors are contiguous and dense (the reference also takes non-contiguous ones); gradients are
float32, bfloat16 or float16 (the reference: any floating dtype); packed tensors have 1-, 2-, 4-
or 8-byte elements, moved as raw bits, one element size per call. Bad arguments raise
``ValueError`` (``TypeError`` for a non-integer offset or run) naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["FUNCTIONS", "Backend", "Plan"]

Ints = Sequence[int]
Tensors = Sequence[torch.Tensor]


@runtime_checkable
class Backend(Protocol):
    """The functions of a masking backend (a module satisfies it structurally)."""

    def mask_(
        self,
        grads: Tensors,
        keys: Ints,
        thresholds: Ints,
        scales: Sequence[float],
        offsets: Ints | None = None,
        runs: Ints | None = None,
        strides: Ints | None = None,
    ) -> None:
        """Mask every gradient in place: ``g * scale`` if kept, ``g * 0`` if dropped, rounded
        once to the gradient's dtype (so a dropped inf or NaN gives NaN)."""

    def mask_counted_(
        self,
        grads: Tensors,
        keys: Ints,
        thresholds: Ints,
        scales: Sequence[float],
        offsets: Ints,
        runs: Ints | None,
        strides: Ints | None,
        starts: torch.Tensor,
    ) -> None:
        """:meth:`mask_`, and fill ``starts`` with the chunk starts :meth:`gather_dropped_many`
        returns for tensors of the gradients' sizes and places."""

    def keep_mask_(self, out: torch.Tensor, key: int, threshold: int, offset: int) -> None:
        """Fill the contiguous bool tensor ``out`` with the keep decisions of stream elements
        ``offset .. offset + out.numel() - 1``."""

    def gather_dropped_many(
        self,
        tensors: Tensors,
        keys: Ints,
        thresholds: Ints,
        offsets: Ints,
        runs: Ints | None = None,
        strides: Ints | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, starts)``: every tensor's dropped elements in local order, tensor after
        tensor, and where each chunk's values begin."""

    def gather_dropped_at(
        self,
        tensors: Tensors,
        keys: Ints,
        thresholds: Ints,
        offsets: Ints,
        runs: Ints | None,
        strides: Ints | None,
        starts: torch.Tensor,
    ) -> torch.Tensor:
        """The ``values`` of :meth:`gather_dropped_many`, packed at the given ``starts``."""

    def mask_gather_dropped_(
        self,
        grads: Tensors,
        tensors: Tensors,
        keys: Ints,
        thresholds: Ints,
        scales: Sequence[float],
        offsets: Ints,
        runs: Ints | None = None,
        strides: Ints | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`mask_` of ``grads`` and :meth:`gather_dropped_many` of ``tensors``
        (``tensors[i]`` is the parameter of ``grads[i]``: its size and element size, one dtype,
        no shared memory)."""

    def scatter_dropped_many(
        self,
        tensors: Tensors,
        keys: Ints,
        thresholds: Ints,
        offsets: Ints,
        runs: Ints | None,
        strides: Ints | None,
        values: torch.Tensor,
        starts: torch.Tensor,
    ) -> None:
        """Write ``values`` back into the dropped elements of every tensor; kept ones stay."""


#: The protocol's function names.
FUNCTIONS = (
    "mask_",
    "mask_counted_",
    "keep_mask_",
    "gather_dropped_many",
    "gather_dropped_at",
    "mask_gather_dropped_",
    "scatter_dropped_many",
)


@dataclass(frozen=True)
class Plan:
    """Which backend takes a tensor, and what to call for it.

    Attributes:
        backend: ``"cpp"``, ``"triton"`` or ``"torch"`` (for messages and tests).
        ops: the module to call (it satisfies :class:`Backend`).
        fused: whether the backend reads and writes each tensor once with the random bits in
            registers; it then takes contiguous tensors only. ``False`` for the reference,
            which hashes every element and builds span-sized masks.
    """

    backend: str
    ops: Backend
    fused: bool

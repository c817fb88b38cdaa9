"""The masking backends, and the one place that chooses among them.

=========  ==========================================  =====================================
backend    what the plan calls                         runs on
=========  ==========================================  =====================================
``cpp``    :mod:`hf_dropgrad.kernels.ops` (the C++     CPU (built on first use by
           kernel is the ops' CPU implementation)      :mod:`hf_dropgrad.kernels.cpp`)
``triton`` :mod:`~hf_dropgrad.kernels.ops` on CUDA,    CUDA (CPU under ``TRITON_INTERPRET=1``)
           :mod:`hf_dropgrad.kernels.triton` else
``torch``  :mod:`hf_dropgrad.kernels.reference`        any device: the oracle and the fallback
=========  ==========================================  =====================================

Every backend offers the same functions with the same signatures and returns, the backend
protocol (:class:`~hf_dropgrad.kernels.protocol.Backend`). The kernels are ``torch.library``
ops (:mod:`hf_dropgrad.kernels.ops`) whose implementation the dispatcher picks by the tensors'
device: the C++ kernel on CPU, Triton on CUDA, the reference elsewhere. ``HF_DROPGRAD_BACKEND``
only forces one, and this module is the one place that reads it: :func:`choose` returns the
:class:`~hf_dropgrad.kernels.protocol.Plan` of a tensor (which backend, the module to call,
what it can do), and :func:`check_forced_backend` refuses, when ``DropGrad`` is built, a forced
backend that cannot run in this environment at all. Nothing outside this package names a
backend.

``auto`` (the default) takes ``cpp`` for CPU tensors, ``triton`` for CUDA tensors when Triton
imports, and ``torch`` for everything else (other devices, float64 gradients, tensor subclasses,
and full update drop of a non-contiguous parameter). A forced backend that cannot take a tensor
raises :class:`BackendUnavailableError` instead of falling back: asking for a backend and
silently getting another would hide exactly what the setting is for. Every backend is
bit-identical to the reference (NaN payloads aside).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import ModuleType
from typing import Literal

import torch

from hf_dropgrad.kernels import loaders, ops, reference
from hf_dropgrad.kernels.protocol import Backend, Plan

__all__ = [
    "BACKENDS",
    "ENV",
    "Backend",
    "BackendUnavailableError",
    "Plan",
    "check_backend_accepts",
    "check_forced_backend",
    "choose",
    "plan_of",
    "requested_backend",
    "triton_module",
]

ENV = "HF_DROPGRAD_BACKEND"
#: Values ``HF_DROPGRAD_BACKEND`` accepts.
BACKENDS = ("auto", "cpp", "triton", "torch")
#: Gradient dtypes the fused masking kernels take (anything else uses ``torch``).
MASK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Purpose = Literal["mask", "pack", "keep"]

class BackendUnavailableError(RuntimeError):
    """The backend forced by ``HF_DROPGRAD_BACKEND`` cannot run here, or cannot take a tensor."""


def requested_backend() -> str:
    """The value of ``HF_DROPGRAD_BACKEND`` (``auto`` when unset), checked."""
    raw = os.environ.get(ENV, "")
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV}={raw!r} is not a masking backend; allowed values: "
            + ", ".join(BACKENDS)
        )
    return value


def triton_module() -> ModuleType | None:
    """:mod:`hf_dropgrad.kernels.triton`, or ``None`` when Triton does not import."""
    return loaders.triton_module()


def check_forced_backend() -> str:
    """The requested backend, after checking that a forced one can run in this environment.

    Called when ``DropGrad`` is built, so a setting that can never work fails before training
    rather than inside the first ``step()``: ``cpp`` needs the C++ library (built here if it is
    not cached yet; not disabled by ``HF_DROPGRAD_DISABLE_EXTENSION=1``), ``triton`` needs Triton
    to import and either a CUDA device or ``TRITON_INTERPRET=1``. It does not look at tensors:
    parameters still on CPU that will move to a GPU are not refused.

    Raises:
        ValueError: ``HF_DROPGRAD_BACKEND`` holds an unknown value.
        BackendUnavailableError: the forced backend cannot run here; the message names it and
            says why.
    """
    requested = requested_backend()
    if requested == "cpp" and loaders.cpp_module() is None:
        raise BackendUnavailableError(
            f"{ENV}=cpp, but the C++ kernel is unavailable: {loaders.cpp_error()}. Unset {ENV} (or "
            "set it to auto) to let hf_dropgrad choose, or torch for the reference path."
        )
    if requested == "triton":
        module = loaders.triton_module()
        if module is None:
            raise BackendUnavailableError(
                f"{ENV}=triton, but Triton does not import: {loaders.triton_error()} (pip install "
                "triton)."
            )
        if not torch.cuda.is_available() and not module.interpreting():
            raise BackendUnavailableError(
                f"{ENV}=triton, but there is no CUDA device (and TRITON_INTERPRET=1 is not set "
                f"for Triton's interpreter). Unset {ENV} (or set it to auto) to let hf_dropgrad "
                "choose."
            )
    return requested


def _why_not(backend: str, tensor: torch.Tensor, purpose: Purpose) -> str | None:
    """Why ``backend`` cannot take ``tensor`` (``None`` when it can)."""
    if type(tensor) is not torch.Tensor:
        return f"it takes plain tensors, got a {type(tensor).__name__} (mask its local tensor)"
    if tensor.layout is not torch.strided:
        return f"it takes dense tensors, got layout {tensor.layout}"
    if purpose == "mask" and tensor.dtype not in MASK_DTYPES:
        return f"it masks float32, bfloat16 and float16 gradients, got {tensor.dtype}"
    if purpose in ("pack", "keep") and tensor.element_size() not in (1, 2, 4, 8):
        return f"it packs 1-, 2-, 4- or 8-byte elements, got {tensor.dtype}"
    device = tensor.device.type
    if backend == "cpp":
        if device != "cpu":
            return f"it runs on CPU tensors, got one on {tensor.device}"
        if loaders.cpp_module() is None:
            return f"it is unavailable: {loaders.cpp_error()}"
    elif backend == "triton":
        if loaders.triton_module() is None:
            return f"Triton does not import: {loaders.triton_error()} (pip install triton)"
        if device != "cuda" and not (
            device == "cpu" and loaders.triton_module().interpreting()  # type: ignore[union-attr]
        ):
            return (
                f"it runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got one "
                f"on {tensor.device}"
            )
    return None


def check_backend_accepts(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Fail now if the backend forced by ``HF_DROPGRAD_BACKEND`` cannot mask one of the tensors.

    ``named_tensors`` are ``(name, tensor)`` pairs of what will be masked (a parameter's local
    tensor, whose device and dtype its gradient shares). With ``auto`` or ``torch`` every
    tensor is accepted. Used at the start of training, before any gradient exists, so a model
    the forced backend cannot take (``cpp`` and a float64 model, ``triton`` and CPU
    parameters) fails before the first forward pass.

    Raises:
        BackendUnavailableError: naming the first tensor the backend cannot take, and why.
    """
    requested = requested_backend()
    if requested in ("auto", "torch"):
        return
    for name, tensor in named_tensors:
        reason = _why_not(requested, tensor, "mask")
        if reason is not None:
            raise BackendUnavailableError(
                f"{ENV}={requested} cannot mask the gradient of {name} ({tensor.dtype}, shape "
                f"{tuple(tensor.shape)}, on {tensor.device}): {reason}. Unset {ENV} (or set it "
                "to auto) to let hf_dropgrad choose, or torch for the reference path."
            )


def plan_of(backend: str, device: torch.device) -> Plan:
    """The plan that runs ``backend`` on tensors of ``device``.

    The ops (the dispatcher then runs the device's implementation, and ``torch.compile`` sees
    one opaque node) when ``backend`` is what the device takes anyway; otherwise the backend's
    own module, called directly: the reference forced on CPU or CUDA, Triton's interpreter on
    CPU tensors.

    Raises:
        BackendUnavailableError: the backend's module cannot be loaded.
    """
    if backend == "torch":
        return _REFERENCE
    if backend == "cpp":
        if loaders.cpp_module() is None:
            raise BackendUnavailableError(f"the cpp backend is unavailable: {loaders.cpp_error()}")
        return _CPP
    if backend == "triton":
        module = loaders.triton_module()
        if module is None:
            raise BackendUnavailableError(
                f"the triton backend is unavailable: {loaders.triton_error()} (pip install triton)"
            )
        return _TRITON_OPS if device.type == "cuda" else Plan("triton", module, fused=True)
    raise ValueError(f"unknown backend {backend!r}; allowed: cpp, triton, torch")


_REFERENCE = Plan("torch", reference, fused=False)
_CPP = Plan("cpp", ops, fused=True)
_TRITON_OPS = Plan("triton", ops, fused=True)


def choose(tensor: torch.Tensor, purpose: Purpose = "mask", requested: str | None = None) -> Plan:
    """The :class:`~hf_dropgrad.kernels.protocol.Plan` for ``tensor``.

    ``requested``: :func:`requested_backend`'s value, read once by callers that choose for
    many tensors (default: read it now).
    ``purpose`` is ``"mask"`` (masking a gradient), ``"pack"`` (saving and restoring the
    dropped values of a parameter for full update drop) or ``"keep"`` (filling a bool tensor
    with keep decisions).

    Raises:
        ValueError: ``HF_DROPGRAD_BACKEND`` holds an unknown value.
        BackendUnavailableError: the forced backend cannot take ``tensor``.
    """
    if requested is None:
        requested = requested_backend()
    if requested == "torch":
        return _REFERENCE
    if requested == "auto":
        device = tensor.device.type
        candidate = "cpp" if device == "cpu" else "triton" if device == "cuda" else None
        if candidate is None or _why_not(candidate, tensor, purpose) is not None:
            return _REFERENCE
        if purpose == "pack" and not tensor.is_contiguous():
            # A fused backend would pack a contiguous copy (a full-size temporary of the
            # parameter); the reference works on it in spans.
            return _REFERENCE
        return plan_of(candidate, tensor.device)
    reason = _why_not(requested, tensor, purpose)
    if reason is not None:
        raise BackendUnavailableError(
            f"{ENV}={requested} cannot take a {tensor.dtype} tensor of shape "
            f"{tuple(tensor.shape)} on {tensor.device}: {reason}. Unset {ENV} (or set it to "
            "auto) to let hf_dropgrad choose, or torch for the reference path."
        )
    return plan_of(requested, tensor.device)

"""Loading the optional backends, each tried once: the C++ library and Triton.

:mod:`hf_dropgrad.kernels` (the choice) and :mod:`hf_dropgrad.kernels.ops` (whose CUDA
implementation calls Triton) both ask here, so neither imports the other for it.
"""

from __future__ import annotations

import threading
from types import ModuleType

__all__ = ["cpp_error", "cpp_module", "triton_error", "triton_module"]

_lock = threading.Lock()
_triton: ModuleType | None = None
_triton_error: str | None = None


def cpp_module() -> ModuleType | None:
    """:mod:`hf_dropgrad.kernels.cpp` once its library is loaded (built on first use), or
    ``None`` when it cannot be."""
    from hf_dropgrad.kernels import cpp

    return cpp if cpp.load() is not None else None


def cpp_error() -> str:
    """Why :func:`cpp_module` returns ``None``."""
    from hf_dropgrad.kernels import cpp

    return cpp.unavailable_reason() or "unknown reason"


def triton_module() -> ModuleType | None:
    """:mod:`hf_dropgrad.kernels.triton`, or ``None`` when Triton does not import."""
    global _triton, _triton_error
    if _triton is not None or _triton_error is not None:
        return _triton
    with _lock:
        if _triton is None and _triton_error is None:
            try:
                from hf_dropgrad.kernels import triton as module

                _triton = module
            except Exception as exc:  # ImportError, or a Triton that cannot initialise
                _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton


def triton_error() -> str | None:
    """Why :func:`triton_module` returns ``None`` (``None`` when it has not)."""
    return _triton_error

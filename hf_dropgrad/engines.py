"""Deprecated: moved to :mod:`hf_dropgrad.integrations`.

``from hf_dropgrad.engines import attach_deepspeed`` keeps working with a ``FutureWarning``;
use ``from hf_dropgrad.integrations.deepspeed import attach_deepspeed``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__: list[str] = []  # every name here is deprecated; see _MOVED

_MOVED = {
    "attach_deepspeed": "hf_dropgrad.integrations.deepspeed",
    "install_under_deepspeed": "hf_dropgrad.integrations.deepspeed",
    "zero_optimizer": "hf_dropgrad.integrations.deepspeed",
    "check_supported_setup": "hf_dropgrad.integrations.accelerate",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"hf_dropgrad.engines.{name} moved to {_MOVED[name]}.{name}; the old name will be "
            "removed in a future release.",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'hf_dropgrad.engines' has no attribute {name!r}")

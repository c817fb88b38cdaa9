"""Deprecated: moved to :mod:`hf_dropgrad.integrations`.

``from hf_dropgrad.engines import attach_deepspeed`` keeps working with a ``FutureWarning``
until the release its row in :mod:`hf_dropgrad.deprecated` names; use
``from hf_dropgrad.integrations.deepspeed import attach_deepspeed``.
"""

from __future__ import annotations

from typing import Any

__all__: list[str] = []  # every name here is deprecated (hf_dropgrad/deprecated.py)


def __getattr__(name: str) -> Any:
    from hf_dropgrad.deprecated import module_attribute

    return module_attribute(__name__, name)

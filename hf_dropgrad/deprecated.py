"""Names removed from the public API, kept working for one more minor release.

Each old name still works and emits a :class:`FutureWarning` that names its replacement
(CHANGELOG.md lists them with the release that removes them). The shims are thin: they hand
the work to the current code, so they cannot drift from it. Nothing here imports
Transformers; :mod:`hf_dropgrad.training_args` and :mod:`hf_dropgrad.callbacks` expose the
old names where they used to live.

==================================================  ==============================================
removed after 0.1.0                                 use instead
==================================================  ==============================================
``hf_dropgrad.training_args.DropGradConfig``        ``hf_dropgrad.settings.DropGradSettings``
``hf_dropgrad.training_args.DROPGRAD_SCHEDULERS``   ``hf_dropgrad.settings.SCHEDULERS`` (classes)
``DropGradCallback.config(args)``                   ``DropGradCallback.settings(args)``
``DropGradTrainingArguments.dropgrad_config``       ``DropGradSettings.from_args(args)``
==================================================  ==============================================
"""

from __future__ import annotations

import warnings
from typing import Any

from hf_dropgrad.settings import SCHEDULERS, DropGradSettings

__all__ = [
    "REMOVED_IN",
    "DropGradConfig",
    "dropgrad_schedulers",
    "module_attribute",
    "warn_deprecated",
]

#: The release that drops the shims of this module.
REMOVED_IN = "0.3.0"


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Emit the :class:`FutureWarning` of a deprecated name: what to use instead, and when the
    old name goes."""
    warnings.warn(
        f"{old} is deprecated and will be removed in hf_dropgrad {REMOVED_IN}; use {new} instead.",
        FutureWarning,
        stacklevel=stacklevel,
    )


class DropGradConfig(DropGradSettings):
    """Deprecated: :class:`~hf_dropgrad.settings.DropGradSettings` under its 0.1.0 name.

    Kept for code written against 0.1.0: the same fields and methods, plus 0.1.0's
    ``from_args(args, **overrides)`` signature and ``scheduler_class_name``. Getting the name
    from :mod:`hf_dropgrad.training_args` emits the :class:`FutureWarning`.
    """

    @classmethod
    def from_args(  # type: ignore[override]
        cls, args: Any, overrides: Any = None, names: Any = None, **keyword_overrides: Any
    ) -> DropGradSettings:
        """0.1.0's ``DropGradConfig.from_args(args, **overrides)`` (the current mapping form
        works too). Returns a :class:`~hf_dropgrad.settings.DropGradSettings`."""
        merged = {**dict(overrides or {}), **keyword_overrides}
        return DropGradSettings.from_args(args, merged, names)

    @property
    def scheduler_class_name(self) -> str:
        """Name of the ``hf_dropgrad`` scheduler class for ``scheduler`` (0.1.0)."""
        return SCHEDULERS[self.scheduler].__name__


def dropgrad_schedulers() -> dict[str, str]:
    """0.1.0's ``DROPGRAD_SCHEDULERS``: ``{scheduler setting: scheduler class name}``."""
    return {kind: cls.__name__ for kind, cls in SCHEDULERS.items()}


#: ``{module: {old name: (replacement as the warning names it, factory)}}``.
_MODULE_ATTRIBUTES: dict[str, dict[str, tuple[str, Any]]] = {
    "hf_dropgrad.training_args": {
        "DropGradConfig": (
            "hf_dropgrad.settings.DropGradSettings", lambda: DropGradConfig
        ),
        "DROPGRAD_SCHEDULERS": (
            "hf_dropgrad.settings.SCHEDULERS (it maps each setting to the class itself)",
            dropgrad_schedulers,
        ),
    },
}


def module_attribute(module: str, name: str) -> Any:
    """The deprecated attribute ``name`` of ``module``, with its warning (for a module's
    ``__getattr__``).

    Raises:
        AttributeError: ``name`` is not a deprecated attribute of ``module``.
    """
    entry = _MODULE_ATTRIBUTES.get(module, {}).get(name)
    if entry is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new, factory = entry
    # stacklevel 4: warn_deprecated, this function, the module's __getattr__, the user's line.
    warn_deprecated(f"{module}.{name}", new, stacklevel=4)
    return factory()

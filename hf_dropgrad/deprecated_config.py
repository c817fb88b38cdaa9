"""0.1.0's settings names, kept as thin shims over :mod:`hf_dropgrad.settings`.

``hf_dropgrad.training_args.DropGradConfig`` and ``DROPGRAD_SCHEDULERS`` resolve to what this
module holds, with the :class:`FutureWarning` of their row in :mod:`hf_dropgrad.deprecated`
(which also names the release that removes them). The shims hand the work to the current
code, so they cannot drift from it. Nothing here imports Transformers.
"""

from __future__ import annotations

from typing import Any

from hf_dropgrad.settings import SCHEDULERS, DropGradSettings

__all__ = ["DropGradConfig", "dropgrad_schedulers"]


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

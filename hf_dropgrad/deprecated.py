"""The deprecated names: one table, and the hooks that serve it.

A public name changes only through a deprecation: the old name keeps working for at least one
more minor release and emits a :class:`FutureWarning` that names its replacement and the
release that removes it. Every such name is one row of :data:`DEPRECATIONS`: the old name, the
new one, the release that deprecated it and the release that removes it (:data:`REMOVED_IN`,
one for all; CHANGELOG.md and the README name the same). Module attributes are served by the
module's ``__getattr__``, which hands the name to :func:`module_attribute`; a deprecated
method or property stays where it is and warns through :func:`warn_deprecated`. A new
deprecation is a new row (plus the three-line ``__getattr__`` in a module that has none yet);
``tests/test_deprecated.py`` walks the table.

This module imports nothing from ``hf_dropgrad``: a row names what its old name resolves to
as a ``"module:attribute"`` string, imported on first use (as the package's lazy names are),
so any module's hook can read the table, the torch core's included, without an import circle.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEPRECATIONS",
    "REMOVED_IN",
    "Deprecation",
    "module_attribute",
    "warn_deprecated",
]

#: The release that removes every deprecated name of :data:`DEPRECATIONS`.
REMOVED_IN = "0.3.0"


@dataclass(frozen=True)
class Deprecation:
    """One deprecated name.

    Args:
        old: the old name as users wrote it: a module attribute's full dotted path
            (``"hf_dropgrad.engines.attach_deepspeed"``), or a method or property as
            ``"Class.name"``.
        new: what to use instead, as the warning names it.
        since: the release that deprecated ``old``.
        target: for a module attribute, ``"module:attribute"`` that ``old`` resolves to;
            ``None`` for a method or property (it stays in its class and warns itself).
        call: ``target`` is a factory; the old name's value is ``target()``.
        removed_in: the release that removes ``old``.
    """

    old: str
    new: str
    since: str
    target: str | None = None
    call: bool = False
    removed_in: str = REMOVED_IN

    @property
    def module(self) -> str | None:
        """The module whose ``__getattr__`` serves ``old`` (None for a method or property)."""
        return self.old.rpartition(".")[0] if self.target is not None else None

    @property
    def name(self) -> str:
        """The attribute name under which ``old`` is looked up."""
        return self.old.rpartition(".")[2]

    def message(self, as_written: str | None = None) -> str:
        """The warning's text; ``as_written`` names the old name as the user reached it (a
        subclass's name, say)."""
        return (f"{as_written or self.old} is deprecated and will be removed in hf_dropgrad "
                f"{self.removed_in}; use {self.new} instead.")

    def warn(self, stacklevel: int = 2, as_written: str | None = None) -> None:
        """Emit the :class:`FutureWarning`; ``stacklevel`` counts from the caller of this."""
        warnings.warn(self.message(as_written), FutureWarning, stacklevel=stacklevel + 1)

    def resolve(self) -> Any:
        """The object ``old`` stands for (a module attribute's row only), without a warning."""
        if self.target is None:
            raise TypeError(f"{self.old} is a method or property, not a module attribute")
        module, _, attribute = self.target.partition(":")
        value = getattr(importlib.import_module(module), attribute)
        return value() if self.call else value


_ENGINES_MOVED = {
    "attach_deepspeed": "deepspeed",
    "install_under_deepspeed": "deepspeed",
    "zero_optimizer": "deepspeed",
    "check_supported_setup": "accelerate",
}

#: Every deprecated name, in the order CHANGELOG.md lists them.
DEPRECATIONS: tuple[Deprecation, ...] = (
    Deprecation("hf_dropgrad.training_args.DropGradConfig",
                "hf_dropgrad.settings.DropGradSettings", "0.2.0",
                "hf_dropgrad.deprecated_config:DropGradConfig"),
    Deprecation("hf_dropgrad.training_args.DROPGRAD_SCHEDULERS",
                "hf_dropgrad.settings.SCHEDULERS (it maps each setting to the class itself)",
                "0.2.0", "hf_dropgrad.deprecated_config:dropgrad_schedulers", call=True),
    Deprecation("DropGradCallback.config(args)", "DropGradCallback.settings(args)", "0.2.0"),
    Deprecation("DropGradTrainingArguments.dropgrad_config",
                "hf_dropgrad.settings.DropGradSettings.from_args(args)", "0.2.0"),
    *(Deprecation(f"hf_dropgrad.engines.{name}",
                  f"hf_dropgrad.integrations.{where}.{name}", "0.2.0",
                  f"hf_dropgrad.integrations.{where}:{name}")
      for name, where in _ENGINES_MOVED.items()),
    Deprecation("hf_dropgrad.schedulers.check_rate", "hf_dropgrad.schedulers.check_rate_number",
                "0.2.0", "hf_dropgrad.schedulers:check_rate_number"),
    Deprecation("hf_dropgrad.callbacks.install_dropgrad(holder, model, settings, steps)",
                "hf_dropgrad.install.install_dropgrad(holder, build)", "0.2.0"),
)

_BY_OLD = {entry.old: entry for entry in DEPRECATIONS}


def warn_deprecated(old: str, *, stacklevel: int = 3, as_written: str | None = None) -> None:
    """Emit the :class:`FutureWarning` of the table's row ``old`` (for a deprecated method or
    property; ``stacklevel=3`` points at the line that called the method).

    Raises:
        KeyError: ``old`` is not in :data:`DEPRECATIONS`.
    """
    _BY_OLD[old].warn(stacklevel=stacklevel, as_written=as_written)


def module_attribute(module: str, name: str) -> Any:
    """The deprecated attribute ``name`` of ``module``, with its warning: what a module's
    ``__getattr__`` returns.

    Raises:
        AttributeError: ``name`` is not a deprecated attribute of ``module``.
    """
    entry = _BY_OLD.get(f"{module}.{name}")
    if entry is None or entry.target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    # stacklevel 3 from here: this function, the module's __getattr__, the user's line.
    entry.warn(stacklevel=3)
    return entry.resolve()

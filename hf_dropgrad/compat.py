"""The one place that knows how the supported Transformers and Accelerate releases differ.

The Transformers layer (``training_args.py``, ``callbacks.py``, ``trainer.py``) supports
transformers 4.56 to 5.x and accelerate 1.10 and later (README, "Supported versions"). Each
of those modules imports this one first thing, so:

- an older transformers or accelerate fails once, at import, with an
  :class:`UnsupportedVersionError` naming the installed and the required versions, instead of
  a ``TypeError`` deep inside the ``Trainer``;
- where the APIs differ inside the supported range, the difference is detected here from the
  API itself (a signature), never from a version string, and the rest of the layer calls the
  helpers below.

Differences handled here:

- ``Trainer.create_optimizer`` takes the model to build the optimizer for (``model=None``)
  since transformers 5.4; before, it takes no argument and always uses ``trainer.model``.
  :func:`call_create_optimizer` passes the model only where the method accepts it (read
  from the signature of the method actually called, so a Trainer subclass that overrides
  ``create_optimizer`` in either form works too).

Checked on 4.56.2, 4.57.6, 5.0.0 and 5.24.0 and found to need nothing here: the callback
events DropGrad uses (``on_pre_optimizer_step`` included), ``processing_class``, the
``Seq2SeqTrainer`` arguments, and saving/loading ``optimizer.pt`` with ``weights_only=True``.
One difference is left to ``engines.py`` (read in the sources, not run: FSDP needs several
processes): without ``fsdp_config["version"]``, transformers 4.x and early 5.x (5.0 still)
run FSDP1 where 5.24 runs FSDP2, and the check made when the Trainer is built assumes FSDP2;
such an FSDP1 run is then refused from the accelerator state at ``on_train_begin``, before
the first step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib import metadata
from typing import Any

__all__ = [
    "MIN_VERSIONS",
    "UnsupportedVersionError",
    "accepts_model",
    "call_create_optimizer",
    "check_versions",
]

#: The oldest release of each package the Transformers layer is tested with (the floors of
#: pyproject.toml's ``transformers`` extra; CI runs the tests at the latest patch of each).
MIN_VERSIONS: dict[str, str] = {"transformers": "4.56", "accelerate": "1.10"}


class UnsupportedVersionError(ImportError):
    """The installed transformers or accelerate is older than the Transformers layer supports."""


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of ``version``: ``"4.57.0.dev0"`` -> ``(4, 57, 0)``."""
    numbers = []
    for part in version.split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) != len(part):  # "0rc1", "0+cpu": the rest is a pre/local tag
            break
    return tuple(numbers)


def check_versions() -> None:
    """Raise :class:`UnsupportedVersionError` unless transformers and accelerate are installed
    at :data:`MIN_VERSIONS` or later."""
    for package, floor in MIN_VERSIONS.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            raise UnsupportedVersionError(
                f"hf_dropgrad's Transformers layer (DropGradTrainer, DropGradCallback, "
                f"DropGradTrainingArguments) needs {package}>={floor}, which is not installed: "
                f"pip install 'hf-dropgrad[transformers]'. The torch core (DropGrad, the "
                f"schedulers) works without it."
            ) from None
        if _release(installed) < _release(floor):
            raise UnsupportedVersionError(
                f"hf_dropgrad's Transformers layer needs {package}>={floor}, but {package} "
                f"{installed} is installed: pip install -U '{package}>={floor}' (the supported "
                f"versions are listed in hf_dropgrad's README, 'Supported versions')."
            )


check_versions()


def accepts_model(create_optimizer: Callable[..., Any]) -> bool:
    """Whether a (bound) ``create_optimizer`` takes the model to build the optimizer for."""
    parameters = inspect.signature(create_optimizer).parameters.values()
    return any(p.name == "model" or p.kind is p.VAR_POSITIONAL for p in parameters)


def call_create_optimizer(create_optimizer: Callable[..., Any], model: Any = None) -> Any:
    """Call a ``Trainer``'s bound ``create_optimizer`` (e.g. ``super().create_optimizer``)
    for ``model``, in the form that method accepts.

    Where it takes no model (transformers before 5.4), the Trainer builds the optimizer for
    ``trainer.model``; the Trainers of those releases never ask for another one.
    """
    if accepts_model(create_optimizer):
        return create_optimizer(model)
    return create_optimizer()

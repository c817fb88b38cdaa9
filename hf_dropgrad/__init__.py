"""hf_dropgrad: gradient dropout (DropGrad) for PyTorch and Hugging Face Transformers.

The torch core (``DropGrad`` and the drop-rate schedulers) imports nothing from
Transformers; the Transformers layer (``DropGradTrainer``, ``DropGradCallback``, ...)
is imported lazily on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hf_dropgrad.in_backward import InBackward
from hf_dropgrad.integrations import fsdp as _fsdp  # noqa: F401 (registers DTensor shards)
from hf_dropgrad.integrations.gloo_exit import destroy_process_groups
from hf_dropgrad.optimizer import DropGrad, get_dropgrad
from hf_dropgrad.schedulers import (
    ConstantDropRateScheduler,
    CosineAnnealingDropRateScheduler,
    DropRateScheduler,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)
from hf_dropgrad.version import __version__ as __version__

_LAZY = {
    "DropGradTrainingArguments": "hf_dropgrad.training_args",
    "DropGradSeq2SeqTrainingArguments": "hf_dropgrad.training_args",
    "DropGradTrainer": "hf_dropgrad.trainer",
    "DropGradSeq2SeqTrainer": "hf_dropgrad.trainer",
    "DropGradCallback": "hf_dropgrad.callbacks",
}

__all__ = [
    "ConstantDropRateScheduler",
    "CosineAnnealingDropRateScheduler",
    "DropGrad",
    "DropRateScheduler",
    "InBackward",
    "LinearDropRateScheduler",
    "StepDropRateScheduler",
    "destroy_process_groups",
    "get_dropgrad",
    "DropGradTrainingArguments",
    "DropGradSeq2SeqTrainingArguments",
    "DropGradTrainer",
    "DropGradSeq2SeqTrainer",
    "DropGradCallback",
]

if TYPE_CHECKING:
    from hf_dropgrad.callbacks import DropGradCallback
    from hf_dropgrad.trainer import DropGradSeq2SeqTrainer, DropGradTrainer
    from hf_dropgrad.training_args import (
        DropGradSeq2SeqTrainingArguments,
        DropGradTrainingArguments,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        importlib.import_module("hf_dropgrad.compat")  # unsupported versions: one clear error
        return getattr(importlib.import_module(_LAZY[name]), name)
    from hf_dropgrad.deprecated import module_attribute  # a deprecated name, or AttributeError

    return module_attribute(__name__, name)

r"""``TrainingArguments`` subclasses that carry DropGrad's settings.

:class:`DropGradTrainingArguments` and :class:`DropGradSeq2SeqTrainingArguments` add the
``dropgrad_*`` fields to Transformers' argument classes: ``HfArgumentParser`` reads them from
the command line, a JSON file or a YAML file, ``__post_init__`` validates them when the
arguments are created (so a bad value fails at parse time, naming its flag), and they are
saved with the other arguments (``to_dict()``, ``to_json_string()``, ``training_args.bin``).

This module only declares the fields and their help, written once: the docstrings' parameter
lists are generated from the help. Parsing and validation live in :mod:`hf_dropgrad.settings`.

Example::

    >>> from transformers import HfArgumentParser
    >>> parser = HfArgumentParser(DropGradTrainingArguments)
    >>> (args,) = parser.parse_args_into_dataclasses(
    ...     ["--output_dir", "out", "--dropgrad_module_rates", "encoder=0.1, decoder=0.2"]
    ... )
    >>> args.dropgrad_module_rates
    {'encoder': 0.1, 'decoder': 0.2}
"""

import textwrap
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from hf_dropgrad.settings import (
    ARG_FIELDS,
    DEFAULT_GAMMA,
    FLAGS,
    parse_module_rates,
    validate_settings,
    warn_unused,
)

__all__ = [
    "DropGradSeq2SeqTrainingArguments",
    "DropGradTrainingArguments",
    "parse_module_rates",  # kept importable from here for scripts written against it
]


@dataclass
class _DropGradArgumentsMixin:
    # First among the bases of the public classes, so that these fields come last in `--help`
    # and `to_dict()`, and this __post_init__ runs the parent's first.

    dropgrad_rate: float = field(
        default=0.0,
        metadata={
            "help": (
                "DropGrad rate: the probability, in [0, 1], that each gradient element is zeroed "
                "before an optimizer step (kept elements are divided by the keep probability, so "
                "the gradient stays unbiased). Applies to every trainable parameter that no "
                "--dropgrad_module_rates pattern matches, and is the first value of a schedule. "
                "0 is an exact no-op."
            )
        },
    )
    dropgrad_module_rates: dict | str | None = field(
        default=None,
        metadata={
            "help": (
                "Per-module DropGrad rates: comma-separated PATTERN=RATE pairs, e.g. "
                "encoder=0.1,decoder=0.2 (blanks allowed), or a JSON object string, e.g. "
                "'{\"encoder\": 0.1}'; a mapping in JSON/YAML config files. A PATTERN of letters, "
                "digits, _ and . only is a module name: it matches that submodule and everything "
                "below it on '.' boundaries ('encoder' matches 'model.encoder.layer.0.weight', "
                "not 'pre_encoder.x'). Any other PATTERN is a regex that must match the whole "
                "parameter name (e.g. '.*attention.*'). A regex beats a module name; a longer "
                "module name beats a shorter one. In the pair form, a comma inside (), [] or {} "
                "(as in 'layer\\.\\d{1,2}\\..*=0.1') or escaped as '\\,' belongs to the pattern, "
                "and the rate follows the last '='. Parameters no pattern matches get "
                "--dropgrad_rate, or no rate at all when it is 0."
            )
        },
    )
    dropgrad_scheduler: str = field(
        default="constant",
        metadata={
            "help": (
                "DropGrad rate schedule over optimizer steps, one of: 'constant'; 'linear' or "
                "'cosine' (from --dropgrad_rate to --dropgrad_final_rate over "
                "--dropgrad_scheduler_steps steps, then constant); 'step' (multiply the rate by "
                "--dropgrad_gamma every --dropgrad_step_size steps). The first step uses "
                "--dropgrad_rate. With --dropgrad_module_rates, every module rate is scaled by "
                "rate(step) / --dropgrad_rate, which must then be > 0."
            )
        },
    )
    dropgrad_final_rate: float = field(
        default=0.0,
        metadata={
            "help": "DropGrad rate, in [0, 1], at the end of a 'linear' or 'cosine' schedule."
        },
    )
    dropgrad_scheduler_steps: int | None = field(
        default=None,
        metadata={
            "help": (
                "Length in optimizer steps (a positive integer) of a 'linear' or 'cosine' "
                "DropGrad schedule. Defaults to the run's total number of optimizer steps "
                "(--max_steps, or what the Trainer computes from --num_train_epochs)."
            )
        },
    )
    dropgrad_step_size: int | None = field(
        default=None,
        metadata={
            "help": (
                "Optimizer steps (a positive integer) between two decays of the 'step' DropGrad "
                "schedule, which requires it."
            )
        },
    )
    dropgrad_gamma: float = field(
        default=DEFAULT_GAMMA,
        metadata={
            "help": (
                "Factor (> 0) the DropGrad rate is multiplied by every --dropgrad_step_size "
                "optimizer steps in the 'step' schedule; the rate is capped at 1."
            )
        },
    )
    dropgrad_full_update_drop: bool = field(
        default=False,
        metadata={
            "help": (
                "Freeze dropped elements for the step: their values after the step equal those "
                "before, reverting the whole optimizer update for them (momentum, weight decay, "
                "...), not only the gradient term. Costs extra memory during the step."
            )
        },
    )
    dropgrad_seed: int | None = field(
        default=None,
        metadata={
            "help": (
                "Seed (an integer in [0, 2**64)) of the DropGrad masks, which depend only on "
                "(seed, optimizer step, parameter), so they are the same on every replica and "
                "after resuming. Defaults to --seed."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        values = {key: getattr(self, arg) for key, arg in ARG_FIELDS.items()}
        values = validate_settings(values, FLAGS)
        for key, value in values.items():
            setattr(self, ARG_FIELDS[key], value)
        warn_unused(values, FLAGS, stacklevel=3)  # the caller of the dataclass __init__

    @property
    def dropgrad_config(self) -> Any:
        """Deprecated (0.1.0's name): use `DropGradSettings.from_args(args)`."""
        from hf_dropgrad.deprecated import warn_deprecated
        from hf_dropgrad.settings import DropGradSettings

        warn_deprecated(
            f"{type(self).__name__}.dropgrad_config",
            "hf_dropgrad.settings.DropGradSettings.from_args(args)",
        )
        return DropGradSettings.from_args(self)


def _parameters_doc() -> str:
    """The docstrings' ``Parameters:`` block, from the fields' help (written once, there)."""
    lines = ["    Parameters:", "        > Parameters that control DropGrad (gradient dropout)", ""]
    for f in fields(_DropGradArgumentsMixin):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kind = kind.replace(" | None", "")
        default = "" if f.default is None else f", defaults to `{f.default!r}`"
        lines.append(f"        {f.name} (`{kind}`, *optional*{default}):")
        lines.extend(textwrap.wrap(
            f.metadata["help"], width=92, initial_indent=" " * 12, subsequent_indent=" " * 12
        ))
    lines += [
        "",
        "    > [!NOTE]",
        "    > The `dropgrad_*` values are validated when the arguments are created, so a bad",
        "    > value raises a `ValueError` naming its flag at parse time; settings that the",
        "    > chosen `dropgrad_scheduler` ignores raise a warning.",
        "",
    ]
    return "\n".join(lines)


@dataclass
class DropGradTrainingArguments(_DropGradArgumentsMixin, TrainingArguments):
    __doc__ = (
        r"""
    [`~transformers.TrainingArguments`] plus the settings of DropGrad, the gradient dropout
    applied by [`DropGradTrainer`] and [`DropGradCallback`].

    This class adds only DropGrad's parameters; for the others, see
    [`~transformers.TrainingArguments`]. Using [`~transformers.HfArgumentParser`] we can turn
    this class into [argparse](https://docs.python.org/3/library/argparse#module-argparse)
    arguments that can be specified on the command line
    (`--dropgrad_rate 0.1 --dropgrad_module_rates encoder=0.1,decoder=0.2`) or in a JSON or
    YAML file.
"""
        + _parameters_doc()
        + r"""
    Example:

    ```python
    >>> from transformers import HfArgumentParser
    >>> from hf_dropgrad import DropGradTrainingArguments

    >>> parser = HfArgumentParser(DropGradTrainingArguments)
    >>> (args,) = parser.parse_args_into_dataclasses(
    ...     ["--output_dir", "out", "--dropgrad_rate", "0.1",
    ...      "--dropgrad_module_rates", "encoder=0.1,decoder=0.2"]
    ... )
    >>> args.dropgrad_module_rates
    {'encoder': 0.1, 'decoder': 0.2}

    ```
"""
    )


@dataclass
class DropGradSeq2SeqTrainingArguments(_DropGradArgumentsMixin, Seq2SeqTrainingArguments):
    __doc__ = (
        r"""
    [`~transformers.Seq2SeqTrainingArguments`] plus the settings of DropGrad, the gradient
    dropout applied by [`DropGradSeq2SeqTrainer`] and [`DropGradCallback`].

    This class adds only DropGrad's parameters; for the others (`predict_with_generate`,
    `generation_max_length`, ...), see [`~transformers.Seq2SeqTrainingArguments`]. Using
    [`~transformers.HfArgumentParser`] we can turn this class into
    [argparse](https://docs.python.org/3/library/argparse#module-argparse) arguments that can
    be specified on the command line or in a JSON or YAML file.
"""
        + _parameters_doc()
    )


def __getattr__(name: str) -> Any:
    # 0.1.0's DropGradConfig and DROPGRAD_SCHEDULERS: deprecated aliases with a FutureWarning
    # (hf_dropgrad/deprecated.py), removed in 0.3.0.
    from hf_dropgrad.deprecated import module_attribute

    return module_attribute(__name__, name)

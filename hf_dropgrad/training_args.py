r"""``TrainingArguments`` subclasses that carry DropGrad's settings.

:class:`DropGradTrainingArguments` and :class:`DropGradSeq2SeqTrainingArguments` add the
``dropgrad_*`` fields to Transformers' argument classes: ``HfArgumentParser`` reads them from
the command line, a JSON file or a YAML file, ``__post_init__`` validates them when the
arguments are created (so a bad value fails at parse time, naming its flag), and they are
saved with the other arguments (``to_dict()``, ``to_json_string()``, ``training_args.bin``).

The fields, their defaults and their help are declared once, in
:class:`hf_dropgrad.arguments.DropGradArguments`, which these classes inherit; the docstrings'
parameter lists are generated from the help. Parsing and validation live in
:mod:`hf_dropgrad.settings`.

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
from dataclasses import dataclass, fields
from typing import Any

from transformers import Seq2SeqTrainingArguments, TrainingArguments

import hf_dropgrad.compat  # noqa: F401  (refuses unsupported transformers/accelerate)
from hf_dropgrad.arguments import DropGradArguments
from hf_dropgrad.settings import (
    ARG_FIELDS,
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


class _DropGradArgumentsMixin(DropGradArguments):
    # First among the bases of the public classes, so that the dropgrad_* fields (declared in
    # hf_dropgrad.arguments) come last in `--help` and `to_dict()`, and this __post_init__
    # runs the parent's first.

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

        warn_deprecated("DropGradTrainingArguments.dropgrad_config",
                        as_written=f"{type(self).__name__}.dropgrad_config")
        return DropGradSettings.from_args(self)


def _parameters_doc() -> str:
    """The docstrings' ``Parameters:`` block, from the fields' help (written once, there)."""
    lines = ["    Parameters:", "        > Parameters that control DropGrad (gradient dropout)", ""]
    for f in fields(DropGradArguments):
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
    # (their rows in hf_dropgrad/deprecated.py name the release that removes them).
    from hf_dropgrad.deprecated import module_attribute

    return module_attribute(__name__, name)

"""The nine ``dropgrad_*`` arguments, declared once: :class:`DropGradArguments`.

Each field carries its default and its help (``metadata["help"]``), written here and nowhere
else: :class:`~hf_dropgrad.training_args.DropGradTrainingArguments` and
:class:`~hf_dropgrad.training_args.DropGradSeq2SeqTrainingArguments` inherit the fields (so
``HfArgumentParser``, ``--help``, IDEs, mypy and pyright see them), their docstrings'
``Parameters:`` block is generated from the help, and so is the README's flags table
(``scripts/gen_flags_table.py``). :class:`hf_dropgrad.settings.DropGradSettings` takes its
defaults from here.

This module declares only; it imports nothing, Transformers included. The values are validated
by the arguments classes' ``__post_init__`` (:func:`hf_dropgrad.settings.validate_settings`).
"""

# No `from __future__ import annotations`: the fields' types stay type objects, which
# HfArgumentParser, the docstrings and the flags table read.
from dataclasses import dataclass, field

__all__ = ["DropGradArguments"]


@dataclass
class DropGradArguments:
    """DropGrad's settings as ``TrainingArguments`` fields (flags, JSON/YAML config keys).

    A mixin: the Transformers layer's argument classes inherit it, first among their bases, so
    these fields come after the parent's in ``--help`` and ``to_dict()``.
    """

    dropgrad_rate: float = field(
        default=0.0,
        metadata={"help": (
            "DropGrad rate: the probability, in [0, 1], that each gradient element is zeroed "
            "before an optimizer step (kept elements are divided by the keep probability, so "
            "the gradient stays unbiased). Applies to every trainable parameter that no "
            "--dropgrad_module_rates pattern matches, and is the first value of a schedule. "
            "0 is an exact no-op."
        )},
    )
    dropgrad_module_rates: dict | str | None = field(
        default=None,
        metadata={"help": (
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
        )},
    )
    dropgrad_scheduler: str = field(
        default="constant",
        metadata={"help": (
            "DropGrad rate schedule over optimizer steps, one of: 'constant'; 'linear' or "
            "'cosine' (from --dropgrad_rate to --dropgrad_final_rate over "
            "--dropgrad_scheduler_steps steps, then constant); 'step' (multiply the rate by "
            "--dropgrad_gamma every --dropgrad_step_size steps). The first step uses "
            "--dropgrad_rate. With --dropgrad_module_rates, every module rate is scaled by "
            "rate(step) / --dropgrad_rate, which must then be > 0."
        )},
    )
    dropgrad_final_rate: float = field(
        default=0.0,
        metadata={"help": (
            "DropGrad rate, in [0, 1], at the end of a 'linear' or 'cosine' schedule."
        )},
    )
    dropgrad_scheduler_steps: int | None = field(
        default=None,
        metadata={"help": (
            "Length in optimizer steps (a positive integer) of a 'linear' or 'cosine' "
            "DropGrad schedule. Defaults to the run's total number of optimizer steps "
            "(--max_steps, or what the Trainer computes from --num_train_epochs)."
        )},
    )
    dropgrad_step_size: int | None = field(
        default=None,
        metadata={"help": (
            "Optimizer steps (a positive integer) between two decays of the 'step' DropGrad "
            "schedule, which requires it."
        )},
    )
    dropgrad_gamma: float = field(
        default=0.5,
        metadata={"help": (
            "Factor (> 0) the DropGrad rate is multiplied by every --dropgrad_step_size "
            "optimizer steps in the 'step' schedule; the rate is capped at 1."
        )},
    )
    dropgrad_full_update_drop: bool = field(
        default=False,
        metadata={"help": (
            "Freeze dropped elements for the step: their values after the step equal those "
            "before, reverting the whole optimizer update for them (momentum, weight decay, "
            "...), not only the gradient term. Costs extra memory during the step."
        )},
    )
    dropgrad_seed: int | None = field(
        default=None,
        metadata={"help": (
            "Seed (an integer in [0, 2**64)) of the DropGrad masks, which depend only on "
            "(seed, optimizer step, parameter), so they are the same on every replica and "
            "after resuming. Defaults to --seed."
        )},
    )

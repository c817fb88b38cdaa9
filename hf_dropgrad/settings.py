r"""DropGrad's settings for the Trainer layer: declared once, every check.

The Transformers-facing classes (``DropGradTrainingArguments``, ``DropGradTrainer``,
``DropGradCallback``) take the same nine settings under different spellings: flags
(``--dropgrad_rate``), Trainer keywords (``dropgrad_rate=``) and callback keywords
(``drop_rate=``). This module holds everything about those settings and imports nothing from
Transformers, only the torch core's :mod:`~hf_dropgrad.schedulers`, :mod:`~hf_dropgrad.patterns`
and :mod:`~hf_dropgrad.optimizer`:

* :class:`DropGradSettings`, **the one declaration** of the nine settings: each field carries
  its default, its help (``metadata["help"]``), its ``TrainingArguments`` field name
  (``metadata["arg"]``) and type (``metadata["arg_type"]``). The argument classes' fields, the
  command-line flags, the README's flags table (``scripts/gen_flags_table.py``) and
  ``DropGradCallback``'s keywords are all generated from it (:data:`SETTING_FIELDS`). An
  instance is the validated, immutable settings of one run, with the run-dependent defaults
  resolved (the seed falls back to ``args.seed``, a schedule's length to the run's optimizer
  steps) and the keyword arguments of ``DropGrad`` they stand for;
* the validators, in one dialect. (The ``PATTERN=RATE`` parser,
  :func:`~hf_dropgrad.patterns.parse_module_rates`, lives with the patterns.)

The dialect:

* A number may be given as a number or as a string that ``float()`` / ``int()`` reads (YAML 1.1
  reads ``1e-1`` as a string); a bool is never a number.
* Every bad value is a :class:`ValueError`; an unknown setting name is a :class:`TypeError`
  (as for an unexpected keyword argument).
* Every message starts with the name of what the user passed, as they wrote it: the flag
  (``--dropgrad_rate: ...``) or the call (``DropGradCallback(drop_rate=...): ...``). The caller
  says which, through a ``names`` mapping (:data:`FLAGS`, :func:`keyword_names`).

Example::

    >>> settings = DropGradSettings(drop_rate=0.1, module_rates="encoder=0.2, decoder=0.3")
    >>> settings.module_rates
    {'encoder': 0.2, 'decoder': 0.3}
    >>> DropGradSettings(drop_rate=1.5)
    Traceback (most recent call last):
    ...
    ValueError: DropGradSettings(drop_rate=...): must be a number in [0, 1] ...
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import Field, InitVar, dataclass, field, fields
from typing import Any

from hf_dropgrad.optimizer import SEED_LIMIT
from hf_dropgrad.patterns import parse_module_rates, parse_rate
from hf_dropgrad.schedulers import (
    ConstantDropRateScheduler,
    CosineAnnealingDropRateScheduler,
    DropRateScheduler,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)

__all__ = [
    "ARG_FIELDS",
    "DEFAULT_GAMMA",
    "FLAGS",
    "SCHEDULERS",
    "SETTING_FIELDS",
    "DropGradSettings",
    "keyword_names",
    "parse_module_rates",  # kept importable from here; defined in hf_dropgrad.patterns
    "parse_rate",  # idem
    "unused_settings",
    "validate_settings",
    "warn_unused",
]

#: Allowed values of the ``scheduler`` setting and the scheduler class each builds.
SCHEDULERS: dict[str, type[DropRateScheduler]] = {
    "constant": ConstantDropRateScheduler,
    "linear": LinearDropRateScheduler,
    "cosine": CosineAnnealingDropRateScheduler,
    "step": StepDropRateScheduler,
}

DEFAULT_GAMMA = 0.5

def keyword_names(owner: str, *, prefixed: bool = False) -> dict[str, str]:
    """How messages name each setting given as a keyword argument of ``owner``.

    Args:
        owner: the class or function the user called, e.g. ``"DropGradCallback"``.
        prefixed: whether the keywords carry the ``dropgrad_`` prefix (``DropGradTrainer``).

    Example::

        >>> keyword_names("DropGradCallback")["drop_rate"]
        'DropGradCallback(drop_rate=...)'
        >>> keyword_names("DropGradTrainer", prefixed=True)["drop_rate"]
        'DropGradTrainer(dropgrad_rate=...)'
    """
    return {key: f"{owner}({arg if prefixed else key}=...)" for key, arg in ARG_FIELDS.items()}


# -- validators: one dialect ------------------------------------------------------------------


def _fail(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"{name}: must be {allowed}, got {value!r}.")


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def check_positive_int(value: Any, name: str, what: str = "optimizer steps") -> int:
    """``value`` as an int ``>= 1``; ``ValueError`` naming ``name`` otherwise."""
    number = _as_int(value)
    if number is None or number < 1:
        raise _fail(name, f"a positive integer ({what})", value)
    return number


def check_seed(value: Any, name: str) -> int:
    """``value`` as an int in ``[0, 2**64)``, the rule of ``DropGrad(seed=)``."""
    number = _as_int(value)
    if number is None or not 0 <= number < SEED_LIMIT:
        raise _fail(name, "an integer in [0, 2**64) (the key of the masks' stream)", value)
    return number


def check_positive_number(value: Any, name: str, what: str) -> float:
    """``value`` as a finite float ``> 0``; ``ValueError`` naming ``name`` otherwise."""
    number = _as_float(value)
    if number is None or not math.isfinite(number) or number <= 0.0:
        raise _fail(name, f"a finite number > 0 ({what})", value)
    return number


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False``; ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value)
    return value


def check_choice(value: Any, name: str, choices: Mapping[str, Any]) -> str:
    """``value`` lower-cased if it is one of ``choices``; ``ValueError`` naming ``name``."""
    kind = value.strip().lower() if isinstance(value, str) else None
    if kind not in choices:
        raise _fail(name, "one of " + ", ".join(map(repr, choices)), value)
    return kind


# -- the nine settings together ---------------------------------------------------------------


def validate_settings(values: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """Check the nine settings, alone and together, and return them normalised.

    Args:
        values: one value per key of :data:`ARG_FIELDS`.
        names: how messages name each setting (:data:`FLAGS` or :func:`keyword_names`).

    Raises:
        ValueError: naming the setting(s) at fault.
    """
    out = dict(values)
    out["drop_rate"] = parse_rate(values["drop_rate"], names["drop_rate"])
    out["final_rate"] = parse_rate(values["final_rate"], names["final_rate"])
    out["module_rates"] = parse_module_rates(values["module_rates"], names["module_rates"])
    kind = out["scheduler"] = check_choice(values["scheduler"], names["scheduler"], SCHEDULERS)
    for key in ("scheduler_steps", "step_size"):
        if values[key] is not None:
            out[key] = check_positive_int(values[key], names[key])
    out["gamma"] = check_positive_number(
        values["gamma"],
        names["gamma"],
        f"the factor applied to the rate every {names['step_size']} steps; the rate is capped "
        "at 1",
    )
    out["full_update_drop"] = check_bool(values["full_update_drop"], names["full_update_drop"])
    if values["seed"] is not None:
        out["seed"] = check_seed(values["seed"], names["seed"])

    if kind == "step" and out["step_size"] is None:
        raise ValueError(
            f"{names['scheduler']}: 'step' multiplies the rate by {names['gamma']} every "
            f"{names['step_size']} optimizer steps; set {names['step_size']} to a positive "
            "integer."
        )
    if kind != "constant" and out["module_rates"] and out["drop_rate"] == 0.0:
        raise ValueError(
            f"{names['scheduler']}: {kind!r} with {names['module_rates']} scales every module "
            f"rate by rate(step) / rate(0), and rate(0) is {names['drop_rate']} = 0. Set "
            f"{names['drop_rate']} > 0 (the schedule's first value, also the rate of parameters "
            f"no pattern matches), or use the 'constant' schedule."
        )
    return out


def unused_settings(values: Mapping[str, Any]) -> list[str]:
    """The settings that the chosen schedule ignores although they differ from their default."""
    kind = values["scheduler"]
    ignored = []
    if kind in ("constant", "step"):
        if values["final_rate"] != 0.0:
            ignored.append("final_rate")
        if values["scheduler_steps"] is not None:
            ignored.append("scheduler_steps")
    if kind != "step":
        if values["step_size"] is not None:
            ignored.append("step_size")
        if values["gamma"] != DEFAULT_GAMMA:
            ignored.append("gamma")
    return ignored


def warn_unused(values: Mapping[str, Any], names: Mapping[str, str], stacklevel: int = 2) -> None:
    """Warn once about :func:`unused_settings`, naming them as the user wrote them.

    Called where the user's input enters (the argument classes, ``DropGradCallback``), never
    when settings are merged later, so each mistake is reported once.
    """
    ignored = [names[key] for key in unused_settings(values)]
    if ignored:
        warnings.warn(
            f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored with "
            f"{names['scheduler']} {values['scheduler']!r}.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def _default_names() -> dict[str, str]:
    return keyword_names("DropGradSettings")


def _setting(default: Any, *, arg: str, arg_type: Any, help: str) -> Any:
    """One setting of :class:`DropGradSettings`: its default, its help, and the name and type
    of the ``TrainingArguments`` field generated from it."""
    return field(default=default, metadata={"help": help, "arg": arg, "arg_type": arg_type})


@dataclass(frozen=True)
class DropGradSettings:
    """DropGrad's settings for one run, validated, with the run-dependent defaults resolved.

    Fields mirror the ``dropgrad_*`` arguments without the prefix (``dropgrad_rate`` is
    ``drop_rate``). Build one from arguments with :meth:`from_args`, which also reads a plain
    ``TrainingArguments`` (missing ``dropgrad_*`` fields take their defaults) and accepts
    overrides.

    How the settings map onto ``DropGrad`` (:meth:`dropgrad_kwargs`):

    - ``drop_rate`` is the rate of every parameter that no ``module_rates`` pattern matches.
      With ``module_rates`` and ``drop_rate == 0``, ``DropGrad`` gets ``drop_rate=None``: those
      parameters get no rate at all (left alone, not listed by ``current_rates()``). Without
      ``module_rates`` it gets ``drop_rate`` as is; 0.0 is an exact no-op.
    - A ``linear``/``cosine``/``step`` schedule starts at ``drop_rate``. Without
      ``module_rates`` its value is every parameter's rate (a warm-up from 0 works) and
      ``DropGrad`` gets ``drop_rate=None``; with ``module_rates`` it scales every base rate by
      ``rate(step) / rate(0)``, so ``drop_rate`` must be > 0.
    - ``constant`` builds no scheduler object.
    - ``seed=None`` leaves DropGrad's own default (torch's initial seed); :meth:`from_args`
      fills it from ``args.seed``.

    Two fields do not take part in comparisons: ``names`` (how messages name each setting,
    as the user wrote it) and ``given`` (the settings set away from their default, worked out
    at construction; the seed counts unless ``seed_from_args=True`` says it is ``args.seed``).

    Example::

        >>> settings = DropGradSettings(drop_rate=0.1, scheduler="linear")
        >>> settings.scheduler_kwargs(num_training_steps=1000)
        {'initial_drop_rate': 0.1, 'final_drop_rate': 0.0, 'num_steps': 1000}
    """

    drop_rate: float = _setting(
        0.0,
        arg="dropgrad_rate",
        arg_type=float,
        help=(
            "DropGrad rate: the probability, in [0, 1], that each gradient element is zeroed "
            "before an optimizer step (kept elements are divided by the keep probability, so "
            "the gradient stays unbiased). Applies to every trainable parameter that no "
            "--dropgrad_module_rates pattern matches, and is the first value of a schedule. "
            "0 is an exact no-op."
        ),
    )
    module_rates: dict[str, float] | None = _setting(  # noqa: RUF009 (returns a field())
        None,
        arg="dropgrad_module_rates",
        arg_type=dict | str | None,
        help=(
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
        ),
    )
    scheduler: str = _setting(
        "constant",
        arg="dropgrad_scheduler",
        arg_type=str,
        help=(
            "DropGrad rate schedule over optimizer steps, one of: 'constant'; 'linear' or "
            "'cosine' (from --dropgrad_rate to --dropgrad_final_rate over "
            "--dropgrad_scheduler_steps steps, then constant); 'step' (multiply the rate by "
            "--dropgrad_gamma every --dropgrad_step_size steps). The first step uses "
            "--dropgrad_rate. With --dropgrad_module_rates, every module rate is scaled by "
            "rate(step) / --dropgrad_rate, which must then be > 0."
        ),
    )
    final_rate: float = _setting(
        0.0,
        arg="dropgrad_final_rate",
        arg_type=float,
        help="DropGrad rate, in [0, 1], at the end of a 'linear' or 'cosine' schedule.",
    )
    scheduler_steps: int | None = _setting(
        None,
        arg="dropgrad_scheduler_steps",
        arg_type=int | None,
        help=(
            "Length in optimizer steps (a positive integer) of a 'linear' or 'cosine' "
            "DropGrad schedule. Defaults to the run's total number of optimizer steps "
            "(--max_steps, or what the Trainer computes from --num_train_epochs)."
        ),
    )
    step_size: int | None = _setting(
        None,
        arg="dropgrad_step_size",
        arg_type=int | None,
        help=(
            "Optimizer steps (a positive integer) between two decays of the 'step' DropGrad "
            "schedule, which requires it."
        ),
    )
    gamma: float = _setting(
        DEFAULT_GAMMA,
        arg="dropgrad_gamma",
        arg_type=float,
        help=(
            "Factor (> 0) the DropGrad rate is multiplied by every --dropgrad_step_size "
            "optimizer steps in the 'step' schedule; the rate is capped at 1."
        ),
    )
    full_update_drop: bool = _setting(
        False,
        arg="dropgrad_full_update_drop",
        arg_type=bool,
        help=(
            "Freeze dropped elements for the step: their values after the step equal those "
            "before, reverting the whole optimizer update for them (momentum, weight decay, "
            "...), not only the gradient term. Costs extra memory during the step."
        ),
    )
    seed: int | None = _setting(
        None,
        arg="dropgrad_seed",
        arg_type=int | None,
        help=(
            "Seed (an integer in [0, 2**64)) of the DropGrad masks, which depend only on "
            "(seed, optimizer step, parameter), so they are the same on every replica and "
            "after resuming. Defaults to --seed."
        ),
    )
    names: Mapping[str, str] = field(default_factory=_default_names, compare=False, repr=False)
    given: frozenset[str] = field(init=False, compare=False, repr=False)
    seed_from_args: InitVar[bool] = False

    def __post_init__(self, seed_from_args: bool) -> None:
        # Validation, normalisation ("0.1" -> 0.1, "a=0.1" -> {"a": 0.1}) and `given` are part
        # of construction, the one place they happen; afterwards nothing changes the object.
        values = validate_settings(self.values(), self.names)
        for key, value in values.items():
            object.__setattr__(self, key, value)
        defaults = {f.name: f.default for f in SETTING_FIELDS}
        given = {key for key in ARG_FIELDS if key != "seed" and values[key] != defaults[key]}
        if values["seed"] is not None and not seed_from_args:
            given.add("seed")
        object.__setattr__(self, "given", frozenset(given))

    def values(self) -> dict[str, Any]:
        """The nine settings as a dict (``names`` and ``given`` left out)."""
        return {key: getattr(self, key) for key in ARG_FIELDS}

    @classmethod
    def from_args(
        cls,
        args: Any,
        overrides: Mapping[str, Any] | None = None,
        names: Mapping[str, str] | None = None,
    ) -> DropGradSettings:
        """Read the ``dropgrad_*`` fields of ``args``, then apply ``overrides``.

        Settings missing from ``args`` (a plain ``TrainingArguments``) take their defaults.
        The seed is ``overrides["seed"]``, else ``args.dropgrad_seed``, else ``args.seed``.

        Args:
            args: the Trainer's arguments.
            overrides: settings given elsewhere (keyword arguments), by this class's names.
            names: how messages name the overrides (and the settings ``args`` lacks).
                Default: :func:`keyword_names` of this class.

        Raises:
            TypeError: an override is not one of the nine settings.
            ValueError: a bad value or combination, naming the settings at fault.
        """
        overrides = dict(overrides or {})
        keyword = dict(names) if names is not None else _default_names()
        unknown = sorted(set(overrides) - set(ARG_FIELDS))
        if unknown:
            raise TypeError(
                f"Unknown DropGrad setting(s) {unknown}; expected one of {list(ARG_FIELDS)}."
            )
        defaults = {f.name: f.default for f in fields(cls) if f.name in ARG_FIELDS}
        values, used_names = {}, {}
        for key, arg in ARG_FIELDS.items():
            if key in overrides:
                values[key], used_names[key] = overrides[key], keyword[key]
            elif hasattr(args, arg):
                values[key], used_names[key] = getattr(args, arg), FLAGS[key]
            else:
                values[key], used_names[key] = defaults[key], keyword[key]
        seed_from_args = values["seed"] is None
        if seed_from_args:
            values["seed"] = getattr(args, "seed", None)
        return cls(**values, names=used_names, seed_from_args=seed_from_args)

    @property
    def enabled(self) -> bool:
        """Whether some parameter can get a non-zero rate at some step.

        ``False`` means ``DropGrad`` would be an exact no-op: the Trainer layer then still
        wraps the optimizer (bit-identical steps, one checkpoint format) but logs nothing, so
        its logs are those of a plain ``Trainer``.
        """
        rates = [self.drop_rate]
        if self.scheduler in ("linear", "cosine"):
            rates.append(self.final_rate)
        if self.module_rates:
            rates.extend(self.module_rates.values())
        return max(rates) > 0.0

    def given_names(self) -> list[str]:
        """The settings the user set away from their defaults, named as they wrote them."""
        return [self.names[key] for key in ARG_FIELDS if key in self.given]

    def num_scheduler_steps(self, num_training_steps: int | None = None) -> int:
        """Length of a ``linear``/``cosine`` schedule: ``scheduler_steps``, else the run's steps.

        Raises:
            ValueError: when ``scheduler_steps`` is unset and ``num_training_steps`` is not a
                positive integer.
        """
        if self.scheduler_steps is not None:
            return self.scheduler_steps
        if (
            isinstance(num_training_steps, bool)
            or not isinstance(num_training_steps, int)
            or num_training_steps <= 0
        ):
            raise ValueError(
                f"{self.names['scheduler']}: the {self.scheduler!r} schedule needs a length: set "
                f"{self.names['scheduler_steps']}, or --max_steps when the Trainer cannot compute "
                f"the run's total optimizer steps (got num_training_steps={num_training_steps!r})."
            )
        return num_training_steps

    def scheduler_kwargs(self, num_training_steps: int | None = None) -> dict[str, Any]:
        """Keyword arguments for ``SCHEDULERS[self.scheduler]``."""
        if self.scheduler == "constant":
            return {"drop_rate": self.drop_rate}
        if self.scheduler == "step":
            return {
                "initial_drop_rate": self.drop_rate,
                "step_size": self.step_size,
                "gamma": self.gamma,
            }
        return {
            "initial_drop_rate": self.drop_rate,
            "final_drop_rate": self.final_rate,
            "num_steps": self.num_scheduler_steps(num_training_steps),
        }

    def build_scheduler(self, num_training_steps: int | None = None) -> DropRateScheduler | None:
        """The ``drop_rate_scheduler=`` for ``DropGrad``, or ``None`` for ``constant``."""
        if self.scheduler == "constant":
            return None
        return SCHEDULERS[self.scheduler](**self.scheduler_kwargs(num_training_steps))

    def dropgrad_kwargs(self, num_training_steps: int | None = None) -> dict[str, Any]:
        """Keyword arguments for ``DropGrad(optimizer, model=model, **kwargs)``.

        ``num_training_steps`` is the run's total number of optimizer steps, the default length
        of a ``linear``/``cosine`` schedule. See the class docstring for the mapping.
        """
        scheduler = self.build_scheduler(num_training_steps)
        if self.module_rates:
            drop_rate = self.drop_rate if self.drop_rate > 0.0 else None
        else:
            drop_rate = None if scheduler is not None else self.drop_rate
        return {
            "drop_rate": drop_rate,
            "params": dict(self.module_rates) if self.module_rates else None,
            "drop_rate_scheduler": scheduler,
            "full_update_drop": self.full_update_drop,
            "seed": self.seed,
        }


#: The nine settings' fields, in declaration order: what every spelling is generated from.
SETTING_FIELDS: tuple[Field, ...] = tuple(
    f for f in fields(DropGradSettings) if "arg" in f.metadata
)

#: Setting -> ``TrainingArguments`` field. Settings drop the prefix so that they read like
#: ``DropGrad``'s and ``DropGradCallback``'s keyword arguments (``drop_rate=``, ...).
ARG_FIELDS: dict[str, str] = {f.name: f.metadata["arg"] for f in SETTING_FIELDS}

#: How messages name each setting when it came from the command line or a config file.
FLAGS: dict[str, str] = {key: f"--{arg}" for key, arg in ARG_FIELDS.items()}

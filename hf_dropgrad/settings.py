r"""DropGrad's settings for the Trainer layer: one value, one set of checks.

The Transformers-facing classes (``DropGradTrainingArguments``, ``DropGradTrainer``,
``DropGradCallback``) take the same nine settings under different spellings: flags
(``--dropgrad_rate``), Trainer keywords (``dropgrad_rate=``) and callback keywords
(``drop_rate=``). This module imports nothing from Transformers, only the torch core and the
declaration of the arguments:

* the nine ``dropgrad_*`` arguments are declared, with their help, in
  :class:`hf_dropgrad.arguments.DropGradArguments`; :data:`ARG_FIELDS` pairs each with its
  setting (``drop_rate`` is ``dropgrad_rate``);
* :class:`DropGradSettings` is the validated, immutable value of one run's settings, with the
  run-dependent defaults resolved (the seed falls back to ``args.seed``, a schedule's length to
  the run's optimizer steps): the keyword arguments of ``DropGrad`` they stand for, and the
  record a checkpoint keeps of them (:meth:`~DropGradSettings.to_record`,
  :meth:`~DropGradSettings.diff`). It holds values only: how the user spelled each setting is
  passed, as a ``names`` mapping (:data:`FLAGS`, :func:`keyword_names`, :func:`setting_names`),
  where a message needs it;
* :class:`GivenSettings`, settings given in Python (a callback's or a Trainer's keywords),
  validated at once and merged with each run's arguments, once per arguments object;
* the validators, in one dialect. (The ``PATTERN=RATE`` parser,
  :func:`~hf_dropgrad.patterns.parse_module_rates`, lives with the patterns.)

The dialect:

* Every bad value is a :class:`ValueError`; an unknown setting name is a :class:`TypeError`
  (as for an unexpected keyword argument).
* Every message starts with the name of what the user passed, as they wrote it: the flag
  (``--dropgrad_rate: ...``) or the call (``DropGradCallback(drop_rate=...): ...``).
* A number given as text is read where text is the medium: the command line and JSON/YAML
  config files, that is the ``dropgrad_*`` fields of the arguments classes (YAML 1.1 reads
  ``1e-1`` as a string); a bool is never a number. Python keyword APIs take numbers: a string
  there (:func:`numbers_given_as_text`) is deprecated (``DropGradCallback``,
  ``DropGradTrainer``) or a ``TypeError`` (``DropGrad``, the schedulers).

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
from collections.abc import Iterable, Mapping
from dataclasses import InitVar, dataclass, field, fields
from typing import Any

from hf_dropgrad.arguments import DropGradArguments
from hf_dropgrad.deprecated import REMOVED_IN
from hf_dropgrad.optimizer import SEED_LIMIT
from hf_dropgrad.patterns import parse_module_rates, parse_rate, resolve_pattern_rates
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
    "DropGradSettings",
    "GivenSettings",
    "keyword_names",
    "numbers_given_as_text",
    "warn_numbers_given_as_text",
    "parse_module_rates",  # kept importable from here; defined in hf_dropgrad.patterns
    "parse_rate",  # idem
    "setting_names",
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

DEFAULT_GAMMA = DropGradArguments.dropgrad_gamma

#: The settings that are numbers (a ``module_rates`` mapping holds numbers too).
_NUMBERS = ("drop_rate", "final_rate", "scheduler_steps", "step_size", "gamma", "seed")


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


def setting_names(
    args: Any, overrides: Iterable[str] = (), names: Mapping[str, str] | None = None
) -> dict[str, str]:
    """How messages name each setting of a run whose settings are ``args``' ``dropgrad_*``
    fields with ``overrides`` given as keywords: the keyword (from ``names``, default
    :func:`keyword_names` of ``DropGradSettings``) for an override, else the flag for a field
    ``args`` has, else the keyword."""
    keyword = dict(names) if names is not None else _default_names()
    given = set(overrides)
    return {
        key: keyword[key] if key in given or not hasattr(args, arg) else FLAGS[key]
        for key, arg in ARG_FIELDS.items()
    }


def numbers_given_as_text(values: Mapping[str, Any]) -> list[str]:
    """The settings in ``values`` that are numbers given as strings (``drop_rate="0.1"``, or a
    ``module_rates`` mapping with a string rate; the ``PATTERN=RATE`` string form is text by
    design and not counted)."""
    found = [key for key in _NUMBERS if isinstance(values.get(key), str)]
    rates = values.get("module_rates")
    if isinstance(rates, Mapping) and any(isinstance(rate, str) for rate in rates.values()):
        found.append("module_rates")
    return found


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


def warn_unused(
    values: Mapping[str, Any],
    names: Mapping[str, str],
    stacklevel: int = 2,
    only: Iterable[str] | None = None,
) -> None:
    """Warn once about :func:`unused_settings`, naming them as the user wrote them.

    Called where the user's input enters (the argument classes, ``DropGradCallback``), never
    when settings are merged later, so each mistake is reported once. ``only`` limits the
    warning to the settings that entered there (default: all).
    """
    entered = set(ARG_FIELDS if only is None else only)
    ignored = [names[key] for key in unused_settings(values) if key in entered]
    if ignored:
        warnings.warn(
            f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored with "
            f"{names['scheduler']} {values['scheduler']!r}.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def warn_numbers_given_as_text(
    values: Mapping[str, Any],
    names: Mapping[str, str],
    stacklevel: int = 2,
    only: Iterable[str] | None = None,
) -> None:
    """Warn that each number given as a string in ``values`` (:func:`numbers_given_as_text`) is
    deprecated, naming it as the user wrote it; ``only`` as in :func:`warn_unused`.

    Called where keyword settings enter (``DropGradCallback``, ``DropGradTrainer``): text is read
    on the command line and in config files, by the arguments classes, and nowhere else.
    """
    entered = set(ARG_FIELDS if only is None else only)
    for key in numbers_given_as_text({key: values[key] for key in entered if key in values}):
        warnings.warn(
            f"{names[key]}: a number given as a string ({values[key]!r}) is deprecated and will "
            f"be a TypeError in hf_dropgrad {REMOVED_IN}; pass a number (e.g. 0.1). Text is "
            "read on the command line and in JSON/YAML config files.",
            FutureWarning,
            stacklevel=stacklevel + 1,
        )


def _default_names() -> dict[str, str]:
    return keyword_names("DropGradSettings")


def _shown(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v:g}" for k, v in value.items()) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


@dataclass(frozen=True)
class DropGradSettings:
    """DropGrad's settings for one run, validated, with the run-dependent defaults resolved.

    Fields mirror the ``dropgrad_*`` arguments without the prefix (``dropgrad_rate`` is
    ``drop_rate``; :data:`ARG_FIELDS`), with the same defaults. Build one from arguments with
    :meth:`from_args`, which also reads a plain ``TrainingArguments`` (missing ``dropgrad_*``
    fields take their defaults) and accepts overrides, or from keyword settings with
    :meth:`from_values`; both name each setting in their messages as the ``names`` they are
    given say. Building one directly names them ``DropGradSettings(drop_rate=...)``.

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

    One more field does not take part in comparisons: ``given``, the settings set away from
    their default, worked out at construction (the seed counts unless ``seed_from_args=True``
    says it is ``args.seed``).

    The methods whose messages name settings take the ``names`` to use (default: this
    class's keywords).

    Example::

        >>> settings = DropGradSettings(drop_rate=0.1, scheduler="linear")
        >>> settings.scheduler_kwargs(num_training_steps=1000)
        {'initial_drop_rate': 0.1, 'final_drop_rate': 0.0, 'num_steps': 1000}
    """

    drop_rate: float = DropGradArguments.dropgrad_rate
    module_rates: dict[str, float] | None = None  # DropGradArguments.dropgrad_module_rates
    scheduler: str = DropGradArguments.dropgrad_scheduler
    final_rate: float = DropGradArguments.dropgrad_final_rate
    scheduler_steps: int | None = DropGradArguments.dropgrad_scheduler_steps
    step_size: int | None = DropGradArguments.dropgrad_step_size
    gamma: float = DropGradArguments.dropgrad_gamma
    full_update_drop: bool = DropGradArguments.dropgrad_full_update_drop
    seed: int | None = DropGradArguments.dropgrad_seed
    given: frozenset[str] = field(init=False, compare=False, repr=False)
    seed_from_args: InitVar[bool] = False

    def __post_init__(self, seed_from_args: bool) -> None:
        # Validation, normalisation ("0.1" -> 0.1, "a=0.1" -> {"a": 0.1}) and `given` are part
        # of construction; afterwards nothing changes the object. (`from_values`/`from_args`
        # validated already, with the user's spellings: this pass finds nothing more.)
        values = validate_settings(self.values(), _default_names())
        for key, value in values.items():
            object.__setattr__(self, key, value)
        defaults = _defaults()
        given = {key for key in ARG_FIELDS if key != "seed" and values[key] != defaults[key]}
        if values["seed"] is not None and not seed_from_args:
            given.add("seed")
        object.__setattr__(self, "given", frozenset(given))

    def values(self) -> dict[str, Any]:
        """The nine settings as a dict (``given`` left out)."""
        return {key: getattr(self, key) for key in ARG_FIELDS}

    @classmethod
    def from_values(
        cls, values: Mapping[str, Any], names: Mapping[str, str] | None = None
    ) -> DropGradSettings:
        """The settings ``values`` gives (by this class's field names; the others take their
        defaults), with messages that name each setting as ``names`` says.

        Raises:
            TypeError: a key is not one of the nine settings.
            ValueError: a bad value or combination, naming the settings at fault.
        """
        _check_known(values)
        names = dict(names) if names is not None else _default_names()
        return cls(**validate_settings({**_defaults(), **values}, names))

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
        Messages name each setting as :func:`setting_names` does.

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
        _check_known(overrides)
        defaults = _defaults()
        values = {
            key: overrides[key] if key in overrides else getattr(args, arg, defaults[key])
            for key, arg in ARG_FIELDS.items()
        }
        seed_from_args = values["seed"] is None
        if seed_from_args:
            values["seed"] = getattr(args, "seed", None)
        values = validate_settings(values, setting_names(args, overrides, names))
        return cls(**values, seed_from_args=seed_from_args)

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

    def check_model(self, model: Any, names: Mapping[str, str] | None = None) -> None:
        """Check the ``module_rates`` patterns against ``model`` (a ``torch.nn.Module``) before
        training: a pattern that matches no parameter, or only frozen ones, is a ``ValueError``
        naming the setting as ``names`` says."""
        if self.module_rates and model is not None:
            names = names if names is not None else _default_names()
            resolve_pattern_rates(
                model.named_parameters(remove_duplicate=False),
                self.module_rates,
                argument=names["module_rates"],
                trained={p for p in model.parameters() if p.requires_grad},
            )

    def given_names(self, names: Mapping[str, str] | None = None) -> list[str]:
        """The settings set away from their defaults (:attr:`given`), named by ``names``."""
        names = names if names is not None else _default_names()
        return [names[key] for key in ARG_FIELDS if key in self.given]

    def num_scheduler_steps(
        self, num_training_steps: int | None = None, names: Mapping[str, str] | None = None
    ) -> int:
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
            names = names if names is not None else _default_names()
            raise ValueError(
                f"{names['scheduler']}: the {self.scheduler!r} schedule needs a length: set "
                f"{names['scheduler_steps']}, or --max_steps when the Trainer cannot compute "
                f"the run's total optimizer steps (got num_training_steps={num_training_steps!r})."
            )
        return num_training_steps

    def scheduler_kwargs(
        self, num_training_steps: int | None = None, names: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
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
            "num_steps": self.num_scheduler_steps(num_training_steps, names),
        }

    def build_scheduler(
        self, num_training_steps: int | None = None, names: Mapping[str, str] | None = None
    ) -> DropRateScheduler | None:
        """The ``drop_rate_scheduler=`` for ``DropGrad``, or ``None`` for ``constant``."""
        if self.scheduler == "constant":
            return None
        return SCHEDULERS[self.scheduler](**self.scheduler_kwargs(num_training_steps, names))

    def dropgrad_kwargs(
        self, num_training_steps: int | None = None, names: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for ``DropGrad(optimizer, model=model, **kwargs)``.

        ``num_training_steps`` is the run's total number of optimizer steps, the default length
        of a ``linear``/``cosine`` schedule. See the class docstring for the mapping.
        """
        scheduler = self.build_scheduler(num_training_steps, names)
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

    def to_record(
        self, num_training_steps: int | None = None, names: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """The settings a run trains with, as plain data (JSON), for a checkpoint to keep: the
        run-dependent defaults resolved (the seed, a schedule's length) and the settings the
        schedule ignores left out.

        Example::

            >>> DropGradSettings(drop_rate=0.1, scheduler="step", step_size=5).to_record()["gamma"]
            0.5
        """
        values = self.values()
        record = {key: values[key] for key in
                  ("drop_rate", "module_rates", "scheduler", "full_update_drop", "seed")}
        if self.scheduler in ("linear", "cosine"):
            record["final_rate"] = self.final_rate
            record["scheduler_steps"] = self.num_scheduler_steps(num_training_steps, names)
        elif self.scheduler == "step":
            record["step_size"] = self.step_size
            record["gamma"] = self.gamma
        return record

    def diff(
        self,
        record: Mapping[str, Any],
        num_training_steps: int | None = None,
        names: Mapping[str, str] | None = None,
    ) -> list[str]:
        """``"<name> <old> -> <new>"`` for each setting that ``record`` (an earlier
        :meth:`to_record`, e.g. a checkpoint's) and this run's record both hold and that
        differs; ``names`` says how to call each setting."""
        current = self.to_record(num_training_steps, names)
        names = names if names is not None else _default_names()
        return [
            f"{names[key]} {_shown(record[key])} -> {_shown(current[key])}"
            for key in current
            if key in record and record[key] != current[key]
        ]


#: Setting -> ``TrainingArguments`` field, in declaration order. Settings drop the prefix so
#: that they read like ``DropGrad``'s and ``DropGradCallback``'s keyword arguments
#: (``drop_rate=``, ...); both classes declare the nine in the same order.
ARG_FIELDS: dict[str, str] = {
    setting.name: argument.name
    for setting, argument in zip(
        [f for f in fields(DropGradSettings) if f.init], fields(DropGradArguments), strict=True
    )
}

#: How messages name each setting when it came from the command line or a config file.
FLAGS: dict[str, str] = {key: f"--{arg}" for key, arg in ARG_FIELDS.items()}


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(DropGradSettings) if f.name in ARG_FIELDS}


def _check_known(values: Mapping[str, Any]) -> None:
    unknown = sorted(set(values) - set(ARG_FIELDS))
    if unknown:
        raise TypeError(
            f"Unknown DropGrad setting(s) {unknown}; expected one of {list(ARG_FIELDS)}."
        )


class GivenSettings:
    """Settings given to the Trainer layer in Python (``DropGradCallback(drop_rate=0.1)``,
    ``DropGradTrainer(dropgrad_rate=0.1)``), merged with each run's ``dropgrad_*`` arguments.

    The values are validated when this is built, with messages that name each setting as
    ``names`` says, so mistakes fail there and not at the first step. :meth:`resolve` merges
    them with a run's arguments (they take precedence) once per arguments object.

    Args:
        values: settings by the names of :class:`DropGradSettings`'s fields.
        names: how messages name each setting (:func:`keyword_names`; :data:`FLAGS` for values
            read from arguments).

    Raises:
        TypeError: a key of ``values`` is not one of the nine settings.
        ValueError: a bad value or combination, naming the settings at fault.
    """

    def __init__(self, values: Mapping[str, Any], names: Mapping[str, str]) -> None:
        self.values = dict(values)
        self.names = dict(names)
        self.validated = DropGradSettings.from_values(self.values, self.names)
        # (arguments object, what was read from it, its settings, their spellings)
        self._run: tuple[Any, tuple[Any, ...], DropGradSettings, dict[str, str]] | None = None

    def entered(self) -> list[str]:
        """The settings given here as keywords: where the user typed them, what to warn about
        (a setting spelled as a flag was read from arguments, whose own checks warned)."""
        return [key for key in self.values if self.names[key] != FLAGS[key]]

    def resolve(self, args: Any) -> tuple[DropGradSettings, dict[str, str]]:
        """The settings of a run with ``args`` (:meth:`DropGradSettings.from_args`) and how
        messages name each of them (:func:`setting_names`); built again only when ``args`` is
        another object or its ``dropgrad_*`` fields or seed changed."""
        read = tuple(getattr(args, arg, None) for arg in ARG_FIELDS.values())
        read += (getattr(args, "seed", None),)
        if self._run is None or self._run[0] is not args or self._run[1] != read:
            settings = DropGradSettings.from_args(args, self.values, self.names)
            self._run = (args, read, settings, setting_names(args, self.values, self.names))
        return self._run[2], self._run[3]

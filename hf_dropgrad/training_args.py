r"""``TrainingArguments`` subclasses that carry DropGrad's settings (SPEC §3, §9).

:class:`DropGradTrainingArguments` and :class:`DropGradSeq2SeqTrainingArguments` add the
``dropgrad_*`` fields to Transformers' argument classes: ``HfArgumentParser`` reads them from
the command line, a JSON file or a YAML file, ``__post_init__`` validates them when the
arguments are created (so a bad value fails at parse time, naming its flag), and they are
saved with the other arguments (``to_dict()``, ``to_json_string()``, ``training_args.bin``).

:class:`DropGradConfig` is the trainer layer's view of the same settings: it resolves the
defaults that depend on the run (the seed falls back to ``args.seed``, the length of a
schedule to the run's total optimizer steps) and turns them into keyword arguments for
``DropGrad``. It reads a plain ``TrainingArguments`` too, with keyword overrides, so
``DropGradCallback`` and ``DropGradTrainer`` can take their settings from either.

Of this package, only the public scheduler classes are imported, lazily, when a schedule is
built; the module itself needs nothing but Transformers.

Example::

    >>> from transformers import HfArgumentParser
    >>> parser = HfArgumentParser(DropGradTrainingArguments)
    >>> (args,) = parser.parse_args_into_dataclasses(
    ...     ["--output_dir", "out", "--dropgrad_module_rates", "encoder=0.1, decoder=0.2"]
    ... )
    >>> args.dropgrad_module_rates
    {'encoder': 0.1, 'decoder': 0.2}
"""

import json
import math
import numbers
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import Seq2SeqTrainingArguments, TrainingArguments

__all__ = [
    "DROPGRAD_SCHEDULERS",
    "DropGradConfig",
    "DropGradSeq2SeqTrainingArguments",
    "DropGradTrainingArguments",
    "parse_module_rates",
]

#: Allowed values of ``--dropgrad_scheduler``, mapped to the ``hf_dropgrad`` scheduler class.
DROPGRAD_SCHEDULERS = {
    "constant": "ConstantDropRateScheduler",
    "linear": "LinearDropRateScheduler",
    "cosine": "CosineAnnealingDropRateScheduler",
    "step": "StepDropRateScheduler",
}

_DEFAULT_GAMMA = 0.5

# DropGradConfig field -> TrainingArguments field. The config drops the prefix so that its
# names read like DropGrad's and DropGradCallback's keyword arguments (drop_rate=, ...).
_ARG_NAMES = {
    "drop_rate": "dropgrad_rate",
    "module_rates": "dropgrad_module_rates",
    "scheduler": "dropgrad_scheduler",
    "final_rate": "dropgrad_final_rate",
    "scheduler_steps": "dropgrad_scheduler_steps",
    "step_size": "dropgrad_step_size",
    "gamma": "dropgrad_gamma",
    "full_update_drop": "dropgrad_full_update_drop",
    "seed": "dropgrad_seed",
}
# What error messages call each setting: the flag for the argument classes, the keyword for
# DropGradConfig.
_FLAGS = {key: f"--{arg}" for key, arg in _ARG_NAMES.items()}
_KWARGS = {key: key for key in _ARG_NAMES}

# Same rule as hf_dropgrad.patterns.is_plain_pattern (SPEC §4).
_PLAIN_NAME = re.compile(r"[\w.]+")
_MODULE_RATES_FORMS = (
    "Expected comma-separated PATTERN=RATE pairs (e.g. encoder=0.1,decoder=0.2), a JSON "
    "object string (e.g. '{\"encoder\": 0.1}') or a mapping {pattern: rate}"
)


# -- value checks shared by the argument classes and DropGradConfig ----------------------------


def _as_rate(value: Any, name: str, what: str = "") -> float:
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-1` as a string; accept what float() reads.
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not 0.0 <= number <= 1.0:  # the comparison also rejects NaN
        where = f"{name}: {what}" if what else f"{name} "
        raise ValueError(
            f"{where}must be a number in [0, 1] (the probability that a gradient element is "
            f"dropped), got {value!r}."
        )
    return number


def _as_int(value: Any, name: str, minimum: int, allowed: str) -> int:
    number = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if number is None or number < minimum:
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
    return number


def _split_top_level(text: str) -> list[str]:
    r"""Split ``text`` on the commas that are outside ``()``, ``[]``, ``{}`` and not escaped.

    This keeps regex quantifiers (``\d{1,2}``), classes (``[,;]``) and groups (``(a|b,c)``)
    whole. Inside a character class, brackets are literal up to the closing ``]``.
    """
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    class_start = -1  # index of the `[` opening the character class we are in, or -1
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif class_start >= 0:
            # A `]` right after `[` or `[^` is a literal `]` in Python's re.
            if char == "]" and text[class_start + 1 : index] not in ("", "^"):
                class_start = -1
        elif char == "[":
            class_start = index
        elif char in "({":
            depth += 1
        elif char in ")}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


class _DuplicatePatternError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicatePatternError(f"pattern {key!r} is given more than once")
        result[key] = value
    return result


def _check_pattern(pattern: str, name: str) -> None:
    if _PLAIN_NAME.fullmatch(pattern):
        if "" in pattern.split("."):
            raise ValueError(
                f"{name}: {pattern!r} is a module name (letters, digits, '_' and '.') with an "
                "empty component (a leading, trailing or doubled '.'); write dotted names such "
                "as 'encoder' or 'encoder.block.0'."
            )
        return
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"{name}: {pattern!r} is not a module name (letters, digits, '_' and '.' only), so "
            f"it is a regular expression, and it does not compile ({error}). For a glob such "
            "as '*attention*' write the regex '.*attention.*'."
        ) from None


def parse_module_rates(
    value: Any, name: str = "--dropgrad_module_rates"
) -> dict[str, float] | None:
    r"""Normalise per-module drop rates to a ``dict[str, float]``, or ``None`` when there are none.

    Accepted forms:

    - a mapping ``{pattern: rate}`` (Python, or a nested mapping in a JSON or YAML config);
    - a JSON object string (its first non-blank character is ``{``), e.g.
      ``'{"encoder": 0.1, "layer\\.\\d{1,2}\\..*": 0.2}'``;
    - comma-separated ``PATTERN=RATE`` pairs, e.g. ``"encoder=0.1, decoder=0.2"``. Blanks
      around items are ignored, and so is a trailing comma. A comma inside ``()``, ``[]`` or
      ``{}``, or escaped as ``\,``, belongs to the pattern, so ``layer\.\d{1,2}\..*=0.1`` needs
      no quoting; the rate is what follows the *last* ``=``.

    Rates may be numbers or strings that ``float()`` reads, in ``[0, 1]``. An empty string or
    mapping gives ``None``. Patterns are checked for syntax only (a dotted module name without
    empty components, or a regex that compiles): what they match is decided when ``DropGrad``
    sees the model.

    Args:
        value: the value to parse.
        name: how error messages name the setting.

    Raises:
        ValueError: naming ``name``, for a malformed string, a duplicated pattern, a pattern
            that is not a non-empty string or a rate outside ``[0, 1]``.

    Example::

        >>> parse_module_rates("encoder=0.1, decoder.block.0=0.2")
        {'encoder': 0.1, 'decoder.block.0': 0.2}
        >>> parse_module_rates(r".*layer\.\d{1,2}\..*=0.3")
        {'.*layer\\.\\d{1,2}\\..*': 0.3}
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.startswith("{"):
            try:
                value = json.loads(text, object_pairs_hook=_no_duplicates)
            except _DuplicatePatternError as error:
                raise ValueError(f"{name}: {error}.") from None
            except ValueError as error:  # json.JSONDecodeError
                raise ValueError(
                    f"{name}: {text!r} is not a valid JSON object ({error}). {_MODULE_RATES_FORMS}."
                ) from None
            if not isinstance(value, dict):
                raise ValueError(f"{name}: {text!r} is not a JSON object. {_MODULE_RATES_FORMS}.")
        else:
            pairs = []
            for item in _split_top_level(text):
                item = item.strip()
                if not item:
                    continue
                pattern, sep, rate = item.rpartition("=")
                if not sep or not pattern.strip():
                    raise ValueError(
                        f"{name}: {item!r} is not a PATTERN=RATE pair. {_MODULE_RATES_FORMS}."
                    )
                pairs.append((pattern.strip(), rate.strip()))
            try:
                value = _no_duplicates(pairs)
            except _DuplicatePatternError as error:
                raise ValueError(f"{name}: {error}.") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: got {type(value).__name__} {value!r}. {_MODULE_RATES_FORMS}.")

    rates: dict[str, float] = {}
    for pattern, rate in value.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"{name}: patterns must be non-empty strings, got {pattern!r}.")
        key = pattern.strip()
        if key in rates:
            raise ValueError(f"{name}: pattern {key!r} is given more than once.")
        _check_pattern(key, name)
        rates[key] = _as_rate(rate, name, what=f"the rate of {key!r} ")
    return rates or None


def _validate(values: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Check DropGrad's settings and return them normalised; ``ValueError`` names the setting."""
    out = dict(values)
    out["drop_rate"] = _as_rate(values["drop_rate"], names["drop_rate"])
    out["final_rate"] = _as_rate(values["final_rate"], names["final_rate"])
    out["module_rates"] = parse_module_rates(values["module_rates"], names["module_rates"])

    scheduler = values["scheduler"]
    kind = scheduler.strip().lower() if isinstance(scheduler, str) else None
    if kind not in DROPGRAD_SCHEDULERS:
        allowed = ", ".join(map(repr, DROPGRAD_SCHEDULERS))
        raise ValueError(f"{names['scheduler']} must be one of {allowed}, got {scheduler!r}.")
    out["scheduler"] = kind

    for key in ("scheduler_steps", "step_size"):
        if values[key] is not None:
            out[key] = _as_int(
                values[key], names[key], 1, "a positive integer (optimizer steps) or None"
            )

    gamma = values["gamma"]
    number = None
    if isinstance(gamma, numbers.Real) and not isinstance(gamma, bool):
        number = float(gamma)
    elif isinstance(gamma, str):
        try:
            number = float(gamma.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number <= 0.0:
        raise ValueError(
            f"{names['gamma']} must be a finite number > 0 (the factor applied to the rate every "
            f"{names['step_size']} steps; the rate is capped at 1), got {gamma!r}."
        )
    out["gamma"] = number

    full_update_drop = values["full_update_drop"]
    if not isinstance(full_update_drop, bool):
        raise ValueError(
            f"{names['full_update_drop']} must be True or False, got {full_update_drop!r}."
        )

    if values["seed"] is not None:
        out["seed"] = _as_int(values["seed"], names["seed"], 0, "an integer >= 0 or None")

    # Combinations.
    if kind == "step" and out["step_size"] is None:
        raise ValueError(
            f"{names['scheduler']} 'step' multiplies the rate by {names['gamma']} every "
            f"{names['step_size']} optimizer steps; set {names['step_size']} to a positive integer."
        )
    if kind != "constant" and out["module_rates"] and out["drop_rate"] == 0.0:
        raise ValueError(
            f"{names['scheduler']} {kind!r} with {names['module_rates']} scales every module rate "
            f"by rate(step) / rate(0), and rate(0) is {names['drop_rate']} = 0. Set "
            f"{names['drop_rate']} > 0 (the schedule's first value, also the rate of parameters no "
            f"pattern matches), or use {names['scheduler']} 'constant'."
        )
    ignored = []
    if kind in ("constant", "step"):
        if out["final_rate"] != 0.0:
            ignored.append(names["final_rate"])
        if out["scheduler_steps"] is not None:
            ignored.append(names["scheduler_steps"])
    if kind != "step":
        if out["step_size"] is not None:
            ignored.append(names["step_size"])
        if out["gamma"] != _DEFAULT_GAMMA:
            ignored.append(names["gamma"])
    if ignored:
        warnings.warn(
            f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored with "
            f"{names['scheduler']} {kind!r}.",
            UserWarning,
            stacklevel=4,  # the caller of the dataclass __init__
        )
    return out


# -- the settings the trainer layer builds DropGrad from --------------------------------------


@dataclass(frozen=True)
class DropGradConfig:
    """DropGrad's settings for one run, validated, with the run-dependent defaults resolved.

    Fields mirror the ``dropgrad_*`` arguments without the prefix (``dropgrad_rate`` is
    ``drop_rate``) and are validated like them (errors name the keyword). Build one from
    arguments with :meth:`from_args`, which also reads a plain ``TrainingArguments`` (missing
    ``dropgrad_*`` fields take their defaults) and accepts keyword overrides.

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

    Example::

        >>> cfg = DropGradConfig(drop_rate=0.1, scheduler="linear")
        >>> cfg.scheduler_kwargs(num_training_steps=1000)
        {'initial_drop_rate': 0.1, 'final_drop_rate': 0.0, 'num_steps': 1000}
        >>> kwargs = cfg.dropgrad_kwargs(num_training_steps=1000)  # doctest: +SKIP
        >>> optimizer = DropGrad(optimizer, model=model, **kwargs)  # doctest: +SKIP
    """

    drop_rate: float = 0.0
    module_rates: dict[str, float] | None = None
    scheduler: str = "constant"
    final_rate: float = 0.0
    scheduler_steps: int | None = None
    step_size: int | None = None
    gamma: float = _DEFAULT_GAMMA
    full_update_drop: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        values = _validate({f.name: getattr(self, f.name) for f in fields(self)}, _KWARGS)
        for key, value in values.items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> "DropGradConfig":
        """Read the ``dropgrad_*`` fields of ``args``; ``overrides`` use this class's names.

        Settings missing from ``args`` (a plain ``TrainingArguments``) take their defaults. The
        seed is ``overrides["seed"]``, else ``args.dropgrad_seed``, else ``args.seed``.
        """
        unknown = sorted(set(overrides) - set(_ARG_NAMES))
        if unknown:
            raise TypeError(f"Unknown DropGrad setting(s) {unknown}; expected {list(_ARG_NAMES)}.")
        defaults = {f.name: f.default for f in fields(cls)}
        values = {key: getattr(args, arg, defaults[key]) for key, arg in _ARG_NAMES.items()}
        values.update(overrides)
        if values["seed"] is None:
            values["seed"] = getattr(args, "seed", None)
        return cls(**values)

    @property
    def enabled(self) -> bool:
        """Whether some parameter can get a non-zero rate at some step.

        ``False`` means ``DropGrad`` would be an exact no-op. The trainer layer still wraps the
        optimizer then (the step is bit-identical to the bare optimizer's, and logs and
        checkpoints keep one format), but may skip extra work such as the rate table.
        """
        rates = [self.drop_rate]
        if self.scheduler in ("linear", "cosine"):
            rates.append(self.final_rate)
        if self.module_rates:
            rates.extend(self.module_rates.values())
        return max(rates) > 0.0

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
                f"The {self.scheduler!r} drop-rate schedule needs a length: set "
                "--dropgrad_scheduler_steps, or --max_steps when the Trainer cannot compute the "
                f"run's total optimizer steps (got num_training_steps={num_training_steps!r})."
            )
        return num_training_steps

    @property
    def scheduler_class_name(self) -> str:
        """Name of the ``hf_dropgrad`` scheduler class for ``scheduler``."""
        return DROPGRAD_SCHEDULERS[self.scheduler]

    def scheduler_kwargs(self, num_training_steps: int | None = None) -> dict[str, Any]:
        """Keyword arguments for the class named by :attr:`scheduler_class_name`."""
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

    def build_scheduler(self, num_training_steps: int | None = None) -> Any:
        """The ``drop_rate_scheduler=`` for ``DropGrad``, or ``None`` for ``constant``."""
        if self.scheduler == "constant":
            return None
        import hf_dropgrad  # the torch core, imported only when a schedule is built

        scheduler_cls = getattr(hf_dropgrad, self.scheduler_class_name)
        return scheduler_cls(**self.scheduler_kwargs(num_training_steps))

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


# -- the argument classes ----------------------------------------------------------------------

_PARAMETERS_DOC = r"""
    Parameters:
        > Parameters that control DropGrad (gradient dropout)

        dropgrad_rate (`float`, *optional*, defaults to `0.0`):
            Probability, in [0, 1], that each gradient element is zeroed before an optimizer
            step; kept elements are divided by the keep probability, so the gradient stays
            unbiased. Applies to every trainable parameter that no `dropgrad_module_rates`
            pattern matches, and is the first value of a schedule. `0.0` is an exact no-op.
        dropgrad_module_rates (`dict[str, float]` or `str`, *optional*):
            Per-module rates `{pattern: rate}`, e.g. `{"encoder": 0.1, "decoder": 0.2}`. A
            pattern made only of letters, digits, `_` and `.` is a module name: it matches that
            submodule (or parameter) and everything below it, on `.` boundaries (`encoder`
            matches `model.encoder.layer.0.weight`, not `pre_encoder.x`). Any other pattern is
            a regular expression that must match the whole parameter name (`.*attention.*`). A
            regex beats a module name; a longer module name beats a shorter one. Parameters no
            pattern matches get `dropgrad_rate`, or no rate at all when it is `0.0`.

            On the command line, write comma-separated `PATTERN=RATE` pairs
            (`encoder=0.1,decoder=0.2`; blanks allowed) or a JSON object string
            (`'{"a{1,2}": 0.1}'`). In the pair form, a comma inside `()`, `[]` or `{}` (as in
            `layer\.\d{1,2}\..*=0.1`) or escaped as `\,` belongs to the pattern, and the rate
            follows the last `=`. After parsing the value is a `dict[str, float]` (or `None`).
        dropgrad_scheduler (`str`, *optional*, defaults to `"constant"`):
            Drop-rate schedule over optimizer steps: `"constant"`; `"linear"` or `"cosine"`
            (from `dropgrad_rate` to `dropgrad_final_rate` over `dropgrad_scheduler_steps`
            steps, then constant); `"step"` (multiply the rate by `dropgrad_gamma` every
            `dropgrad_step_size` steps). The first step uses `dropgrad_rate`. With
            `dropgrad_module_rates`, each module rate is scaled by `rate(step) / dropgrad_rate`,
            so `dropgrad_rate` must then be positive.
        dropgrad_final_rate (`float`, *optional*, defaults to `0.0`):
            Rate, in [0, 1], at the end of a `"linear"` or `"cosine"` schedule.
        dropgrad_scheduler_steps (`int`, *optional*):
            Length in optimizer steps of a `"linear"` or `"cosine"` schedule. Defaults to the
            run's total number of optimizer steps (`max_steps`, or what the Trainer computes
            from `num_train_epochs`).
        dropgrad_step_size (`int`, *optional*):
            Optimizer steps between two decays of the `"step"` schedule, which requires it.
        dropgrad_gamma (`float`, *optional*, defaults to `0.5`):
            Factor (> 0) the rate is multiplied by every `dropgrad_step_size` steps in the
            `"step"` schedule; the rate is capped at 1.
        dropgrad_full_update_drop (`bool`, *optional*, defaults to `False`):
            Freeze dropped elements for the step: their values after the step equal those
            before, reverting the whole optimizer update for them (momentum, weight decay, ...),
            not only the gradient term. Costs extra memory during the step (see `DropGrad`).
        dropgrad_seed (`int`, *optional*):
            Seed of the masks, which depend only on (seed, optimizer step, parameter), so they
            are the same on every data-parallel replica and after resuming. Defaults to `seed`.

    > [!NOTE]
    > The `dropgrad_*` values are validated when the arguments are created, so a bad value
    > raises a `ValueError` naming its flag at parse time. Settings that the chosen
    > `dropgrad_scheduler` does not use (e.g. `dropgrad_gamma` with `"linear"`) raise a
    > warning. `dropgrad_module_rates` is parsed by this class rather than through
    > `TrainingArguments._VALID_DICT_FIELDS`, so a malformed JSON string is reported against
    > its flag.
"""


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
        default=_DEFAULT_GAMMA,
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
                "Seed (an integer >= 0) of the DropGrad masks, which depend only on (seed, "
                "optimizer step, parameter), so they are the same on every data-parallel replica "
                "and after resuming. Defaults to --seed."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        values = {key: getattr(self, arg) for key, arg in _ARG_NAMES.items()}
        for key, value in _validate(values, _FLAGS).items():
            setattr(self, _ARG_NAMES[key], value)

    @property
    def dropgrad_config(self) -> DropGradConfig:
        """The resolved :class:`DropGradConfig` of these arguments (seed defaults to ``seed``)."""
        return DropGradConfig.from_args(self)


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
        + _PARAMETERS_DOC
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
        + _PARAMETERS_DOC
    )

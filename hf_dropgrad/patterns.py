r"""Resolve drop rates given by submodule-name patterns (docs/design.md, "Per-module rates").

``DropGrad(opt, params={"encoder": 0.1, "decoder": 0.2})`` names submodules instead of
parameters. This module turns such a mapping into one rate per parameter tensor. It is pure
(no state, no randomness) and imports only :mod:`torch`.

Rules, PEFT-like:

* **Plain names.** A pattern made only of letters, digits, ``_`` and ``.`` is a *plain name*:
  ``.`` separates components and is not a regex character. It matches the submodule or
  parameter it names and everything below it, at any depth, on component boundaries:
  ``encoder`` matches ``encoder.block.0.layer.0.SelfAttention.q.weight``,
  ``model.encoder.layers.0.fc1.weight`` and ``base_model.model.encoder.x``, but not
  ``pre_encoder.x`` nor ``encoderx.y``; ``encoder.block.0`` does not match
  ``encoder.block.01.x``.
* **Regexes.** Any other pattern is a regular expression that must :func:`re.fullmatch` the
  whole parameter name (``.*SelfAttention.*``, ``(?i).*attention.*``). Matching is
  case-sensitive unless the regex says otherwise.

Precedence, when several patterns match one parameter name, the more specific wins:

1. A regex beats any plain name.
2. Two matching regexes with different rates are an error (:class:`ValueError` naming both
   and the parameter). Matching regexes with the same rate agree; the first in mapping order
   is reported as the winner.
3. Among plain names, the one with more components wins (``encoder.block.0`` beats
   ``encoder``).
4. Among plain names with as many components, the one that names a **deeper** part of the
   model wins: compare the depth of each name's shallowest occurrence anywhere in the model
   (its number of leading components; ``cls`` lives at depth 1 in bert2bert,
   ``layer_norm`` at depth 5 in T5, ``encoder`` and ``decoder`` at depth 0). So
   ``{"decoder": 0.2, "cls": 0.3}`` gives bert2bert's ``decoder.cls`` 0.3 and
   ``{"decoder": 0.2, "layer_norm": 0.0}`` gives T5's decoder layer norms 0.0, as an override
   should, whatever the number of layers.
5. At equal depth, the match nearer the root (starting at an earlier component of the
   parameter name) wins: the enclosing section. A bert2bert ``EncoderDecoderModel``'s decoder
   holds a submodule ``decoder.bert.encoder``; ``encoder`` and ``decoder`` both name top-level
   sections, so ``{"encoder": 0.1, "decoder": 0.2}`` gives all of the decoder 0.2. (Plain
   "innermost wins" would give most of the decoder the encoder's rate; plain "outermost wins"
   would ignore every nested override. This rule gets both right.)

The table printed at training start (:func:`format_rate_table`) shows the outcome; a regex
(which beats plain names) or a longer plain name settles any doubt.

Tied (shared) parameters: a tensor reachable under several names (T5's ``shared.weight`` is
also ``encoder.embed_tokens.weight``, ``decoder.embed_tokens.weight`` and, with tied word
embeddings, ``lm_head.weight``) gets exactly **one** rate. Every name is matched as above and
the best match over all names wins by rules 1-4 (regex, then more components, then the
deeper-living name; the start position of rule 5 is not compared across different names).
When names still tie, the name listed **first** wins: the canonical name
:meth:`torch.nn.Module.named_parameters` reports, then the aliases in module order. So for T5,
``{"encoder": 0.1, "decoder": 0.2}`` gives the shared embedding 0.1 (``encoder.embed_tokens``
comes before ``decoder.embed_tokens``); ``{"shared": 0.0, "encoder": 0.1, "decoder": 0.2}``
gives it 0.0 (``shared.weight`` comes first); ``{"encoder": 0.1, "decoder.embed_tokens": 0.3}``
gives it 0.3 (more components): a pattern naming only an alias still reaches the tensor. Pass
every name, aliases included (``model.named_parameters(remove_duplicate=False)``), or aliases
cannot be matched.

A pattern that matches no name is an error that lists the closest module and parameter names;
one that matches only parameters that do not train (frozen, or outside the optimizer) is an
error that says so. Pattern syntax is checked in one place, :func:`check_pattern`.

Patterns given as text (``--dropgrad_module_rates encoder=0.1,decoder=0.2``, a JSON object
string, a mapping read from a JSON or YAML config) are read by :func:`parse_module_rates`, the
``PATTERN=RATE`` parser the settings layer (:mod:`hf_dropgrad.settings`) uses; its rates follow
:func:`parse_rate`, the rule for a rate read from text.
"""

from __future__ import annotations

import difflib
import json
import numbers
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "RateRow",
    "ResolvedRate",
    "check_pattern",
    "format_rate_table",
    "is_plain_pattern",
    "parse_module_rates",
    "parse_rate",
    "resolve_pattern_rates",
]

_PLAIN_RE = re.compile(r"[\w.]+")
_RULES_HINT = (
    "A plain name (letters, digits, '_' and '.') matches that submodule or parameter and "
    "everything below it, on '.' boundaries, at any depth (e.g. 'encoder', "
    "'encoder.block.0'); any other pattern is a regular expression that must match the whole "
    "parameter name (e.g. '.*SelfAttention.*')."
)
_MODULE_RATES_FORMS = (
    "Expected comma-separated PATTERN=RATE pairs (e.g. encoder=0.1,decoder=0.2), a JSON "
    "object string (e.g. '{\"encoder\": 0.1}') or a mapping {pattern: rate}"
)


class ResolvedRate(NamedTuple):
    """The rate one parameter tensor got from a pattern mapping.

    A plain tuple ``(rate, name, pattern)`` with field names.

    Attributes:
        rate (float): the drop rate.
        name (str): the tensor's canonical name, the first name it appears under.
        pattern (str): the pattern that decided the rate.
    """

    rate: float
    name: str
    pattern: str


class _Pattern(NamedTuple):
    text: str
    rate: float
    parts: tuple[str, ...] | None  # components of a plain name, else None
    regex: re.Pattern[str] | None  # compiled regex, else None


#: A row of :func:`format_rate_table`: ``(name, rate, pattern)`` or ``(..., numel)``.
RateRow = tuple[str, float | None, str | None] | tuple[str, float | None, str | None, int]

# A match's rank, bigger wins: (1, 0, 0, 0) for a regex, (0, components, depth of the name's
# shallowest occurrence, -start) for a plain name. Between aliases only the first three count.
_Rank = tuple[int, int, int, int]
# One name's matches: plain names with the component they start at, and regexes.
_Hits = tuple[list[tuple[_Pattern, int]], list[_Pattern]]


def is_plain_pattern(pattern: str) -> bool:
    r"""Return whether ``pattern`` is a plain dotted name rather than a regex.

    A plain name is made only of letters, digits, ``_`` and ``.``; everything else is treated
    as a regular expression.

    Args:
        pattern (str): a key of the pattern mapping.

    Returns:
        bool: ``True`` for a plain name.

    Example::

        >>> is_plain_pattern("encoder.block.0")
        True
        >>> is_plain_pattern(".*SelfAttention.*")
        False
    """
    return _PLAIN_RE.fullmatch(pattern) is not None


def check_pattern(pattern: str, argument: str = "params") -> None:
    r"""Check the syntax of one pattern: a plain name without empty components, or a regex.

    The one syntax check of the package: :func:`resolve_pattern_rates` and the ``PATTERN=RATE``
    parser (:func:`parse_module_rates`) both use it, so a mistake reads the same wherever it is
    made.

    Args:
        pattern (str): a key of the pattern mapping.
        argument (str): how the message names the setting. Default: ``"params"``.

    Raises:
        TypeError: ``pattern`` is not a ``str``.
        ValueError: ``pattern`` is empty, a plain name with an empty component, or a regex
            that does not compile.

    Example::

        >>> check_pattern(r"layer\.\d+\..*")
        >>> try:
        ...     check_pattern("encoder..block", "--dropgrad_module_rates")
        ... except ValueError as error:
        ...     print(str(error)[:62])
        --dropgrad_module_rates: plain name 'encoder..block' has an em
    """
    _compile_pattern(pattern, 0.0, argument)


def parse_rate(value: Any, name: str) -> float:
    """Read a drop rate given as text or as a number: a number, or a string that ``float()``
    reads (YAML 1.1 reads ``1e-1`` as a string), never a bool, in ``[0, 1]``.

    The rule for rates where text is the medium (the command line, JSON and YAML configs, the
    ``PATTERN=RATE`` form). Python arguments take numbers only
    (:func:`hf_dropgrad.schedulers.check_rate_number`).

    Args:
        value: the rate.
        name: how the message names the setting (``--dropgrad_rate``).

    Raises:
        ValueError: ``"<name>: must be a number in [0, 1] (...), got <value>."``

    Example::

        >>> parse_rate(" 1e-1 ", "--dropgrad_rate")
        0.1
    """
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None or not 0.0 <= number <= 1.0:  # the comparison also rejects NaN
        raise ValueError(
            f"{name}: must be a number in [0, 1] (the probability that a gradient element is "
            f"dropped), got {value!r}."
        )
    return number


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

    Rates follow :func:`parse_rate` (numbers or numeric strings in ``[0, 1]``). An empty string
    or mapping gives ``None``. Patterns are checked for syntax only, by :func:`check_pattern`:
    what they match is decided when ``DropGrad`` sees the model.

    Args:
        value: the value to parse.
        name: how error messages name the setting.

    Raises:
        ValueError: naming ``name``, for a malformed string, a duplicated pattern, a pattern
            that is not a non-empty string or is malformed, or a rate outside ``[0, 1]``.

    Example::

        >>> parse_module_rates("encoder=0.1, decoder.block.0=0.2")
        {'encoder': 0.1, 'decoder.block.0': 0.2}
        >>> parse_module_rates(r".*layer\.\d{1,2}\..*=0.3")
        {'.*layer\\.\\d{1,2}\\..*': 0.3}
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = _parse_text(value, name)
        if value is None:
            return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: got {type(value).__name__} {value!r}. {_MODULE_RATES_FORMS}.")

    rates: dict[str, float] = {}
    for pattern, rate in value.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"{name}: patterns must be non-empty strings, got {pattern!r}.")
        key = pattern.strip()
        if key in rates:
            raise ValueError(f"{name}: pattern {key!r} is given more than once.")
        check_pattern(key, name)
        rates[key] = parse_rate(rate, f"{name}: the rate of {key!r}")
    return rates or None


def _parse_text(value: str, name: str) -> dict[str, Any] | None:
    text = value.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            parsed = json.loads(text, object_pairs_hook=_no_duplicates)
        except _DuplicatePatternError as error:
            raise ValueError(f"{name}: {error}.") from None
        except ValueError as error:  # json.JSONDecodeError
            raise ValueError(
                f"{name}: {text!r} is not a valid JSON object ({error}). {_MODULE_RATES_FORMS}."
            ) from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{name}: {text!r} is not a JSON object. {_MODULE_RATES_FORMS}.")
        return parsed
    pairs = []
    for item in _split_top_level(text):
        item = item.strip()
        if not item:
            continue
        pattern, sep, rate = item.rpartition("=")
        if not sep or not pattern.strip():
            raise ValueError(f"{name}: {item!r} is not a PATTERN=RATE pair. {_MODULE_RATES_FORMS}.")
        pairs.append((pattern.strip(), rate.strip()))
    try:
        return _no_duplicates(pairs)
    except _DuplicatePatternError as error:
        raise ValueError(f"{name}: {error}.") from None


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


def resolve_pattern_rates(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    patterns: Mapping[str, float],
    *,
    argument: str = "params",
    trained: Container[torch.Tensor] | None = None,
) -> dict[torch.Tensor, ResolvedRate]:
    r"""Give each parameter tensor the rate of the pattern that matches it best.

    See the module docstring for the matching rules, the precedence and the rule for tied
    parameters.

    Args:
        named_parameters (iterable of (str, Tensor)): every name of every parameter, aliases of
            tied parameters included, e.g. ``model.named_parameters(remove_duplicate=False)``.
            The same tensor may appear under several names; its first name is its canonical
            name. Include frozen parameters too, so that a pattern naming only frozen ones is
            not reported as matching nothing; the caller ignores tensors it does not optimise.
        patterns (Mapping[str, float]): pattern -> drop rate. Rates are expected to be
            validated already.
        argument (str): the argument name used in error messages. Default: ``"params"``.
        trained (container of Tensor, optional): the tensors that train (e.g. those with
            ``requires_grad`` in the optimizer). Others are matched, so a pattern naming only
            them is reported as such rather than as matching nothing, but get no entry.
            Default: every tensor trains.

    Returns:
        dict[Tensor, ResolvedRate]: one entry per trained tensor that some pattern matched,
        keyed by the tensor itself (tensors hash by identity), in order of first appearance.

    Raises:
        TypeError: a key of ``patterns`` is not a ``str``.
        ValueError: a pattern is empty, malformed or an invalid regex; two regexes with
            different rates match one name; or a pattern matches no name.

    Example::

        >>> model = torch.nn.ModuleDict(
        ...     {"encoder": torch.nn.Linear(2, 2), "decoder": torch.nn.Linear(2, 2)}
        ... )
        >>> resolved = resolve_pattern_rates(
        ...     model.named_parameters(remove_duplicate=False), {"encoder": 0.1, "decoder": 0.2}
        ... )
        >>> resolved[model["decoder"].weight]
        ResolvedRate(rate=0.2, name='decoder.weight', pattern='decoder')
    """
    compiled = _compile_patterns(patterns, argument)
    # Group the names of each tensor, keeping first-appearance order (dicts are ordered).
    tensors: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, param in named_parameters:
        _, names = tensors.setdefault(id(param), (param, []))
        if name not in names:
            names.append(name)
    if not compiled:
        return {}

    regexes = [p for p in compiled if p.regex is not None]
    plains = [p for p in compiled if p.parts is not None]
    # Pass 1: every match of every name, and the depth where each plain name first occurs.
    hits_per_tensor: list[list[_Hits]] = []
    matched: set[str] = set()
    matched_trained: set[str] = set()
    depth: dict[str, int] = {}
    for param, names in tensors.values():
        hits = [_match_name(name, regexes, plains, argument) for name in names]
        trains = trained is None or param in trained
        for plain, regex in hits:
            texts = [p.text for p in regex] + [p.text for p, _ in plain]
            matched.update(texts)
            if trains:
                matched_trained.update(texts)
            for p, start in plain:
                depth[p.text] = min(start, depth.get(p.text, start))
        hits_per_tensor.append(hits)

    unmatched = [p for p in compiled if p.text not in matched]
    if unmatched:
        all_names = [name for _, names in tensors.values() for name in names]
        raise ValueError(_no_match_message(unmatched, all_names, argument))
    untrained = [p for p in compiled if p.text not in matched_trained]
    if untrained:
        raise ValueError(_untrained_message(untrained, tensors.values(), hits_per_tensor, argument))

    # Pass 2: the best match per name, then the best name per tensor.
    resolved: dict[torch.Tensor, ResolvedRate] = {}
    for (param, names), hits in zip(tensors.values(), hits_per_tensor, strict=True):
        if trained is not None and param not in trained:
            continue
        best: tuple[_Rank, _Pattern] | None = None
        for plain, regex in hits:
            if regex:
                candidate: tuple[_Rank, _Pattern] = ((1, 0, 0, 0), regex[0])
            elif plain:
                candidate = max(
                    (((0, len(p.parts or ()), depth[p.text], -start), p) for p, start in plain),
                    key=lambda item: item[0],
                )
            else:
                continue
            # Strictly greater: at a tie the earlier name (the canonical one first) keeps it.
            if best is None or candidate[0][:3] > best[0][:3]:
                best = candidate
        if best is not None:
            resolved[param] = ResolvedRate(best[1].rate, names[0], best[1].text)
    return resolved


def format_rate_table(
    rows: Sequence[RateRow],
    max_rows: int = 40,
) -> str:
    r"""Format which parameters got which drop rate as an aligned text table.

    With at most ``max_rows`` rows every parameter gets a line. Longer tables (a t5-small has
    131 parameters) are collapsed to one line per ``(rate, pattern)`` group, in order of first
    appearance, with the group's parameter and element counts and its first name; if even the
    groups exceed ``max_rows``, the rest are summed up in one line. A footer gives the totals.

    Args:
        rows (sequence of tuples): ``(name, rate, pattern)`` or
            ``(name, rate, pattern, numel)`` per parameter. ``rate=None`` means no rate (the
            gradient is left alone) and is shown as ``-``; ``pattern=None`` (e.g. a rate from
            ``drop_rate`` or a ``Parameter`` key) is shown as ``-``. Element counts are shown
            when every row has one.
        max_rows (int): the most table lines, header and footer aside. Default: 40.

    Returns:
        str: the table, lines joined by ``"\n"``, no trailing newline.

    Example::

        >>> print(format_rate_table([("encoder.w", 0.1, "encoder", 4), ("head.w", None, None, 2)]))
        parameter  rate  pattern  elements
        encoder.w   0.1  encoder         4
        head.w        -  -               2
        2 parameters (6 elements): 1 with a drop rate, 1 without
    """
    if max_rows < 1:
        raise ValueError(f"Invalid max_rows: {max_rows} (must be >= 1)")
    with_numel = bool(rows) and all(len(row) > 3 for row in rows)
    numels = [int(row[3]) for row in rows] if with_numel else [0] * len(rows)

    if len(rows) <= max_rows:
        header = ["parameter", "rate", "pattern"] + (["elements"] if with_numel else [])
        body = [
            [row[0], _fmt_rate(row[1]), row[2] if row[2] is not None else "-"]
            + ([f"{numel:,}"] if with_numel else [])
            for row, numel in zip(rows, numels, strict=True)
        ]
        right = {1, 3}
    else:
        groups: dict[tuple[float | None, str | None], list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((row[1], row[2]), []).append(i)
        header = ["rate", "pattern", "parameters"] + (["elements"] if with_numel else [])
        header.append("names")
        body = []
        items = list(groups.items())
        shown = items if len(items) <= max_rows else items[: max_rows - 1]
        for (rate, pattern), idx in shown:
            first = rows[idx[0]][0]
            names = first if len(idx) == 1 else f"{first}, ... (+{len(idx) - 1} more)"
            body.append(
                [_fmt_rate(rate), pattern if pattern is not None else "-", f"{len(idx):,}"]
                + ([f"{sum(numels[i] for i in idx):,}"] if with_numel else [])
                + [names]
            )
        if len(shown) < len(items):
            rest = [i for _, idx in items[len(shown) :] for i in idx]
            body.append(
                ["...", f"({len(items) - len(shown)} more groups)", f"{len(rest):,}"]
                + ([f"{sum(numels[i] for i in rest):,}"] if with_numel else [])
                + [""]
            )
        right = {0, 2, 3} if with_numel else {0, 2}

    lines = _align([header, *body], right)
    n_rated = sum(row[1] is not None for row in rows)
    total = f"{len(rows):,} parameters" + (f" ({sum(numels):,} elements)" if with_numel else "")
    lines.append(f"{total}: {n_rated:,} with a drop rate, {len(rows) - n_rated:,} without")
    return "\n".join(lines)


def _compile_patterns(patterns: Mapping[str, float], argument: str) -> list[_Pattern]:
    return [_compile_pattern(text, rate, argument) for text, rate in patterns.items()]


def _compile_pattern(text: object, rate: float, argument: str) -> _Pattern:
    if not isinstance(text, str):
        # No repr of a tensor key: it would print the whole tensor.
        shown = "" if isinstance(text, torch.Tensor) else f" {text!r}"[:60]
        raise TypeError(f"{argument}: pattern keys must be str, got {type(text).__name__}{shown}")
    if not text:
        raise ValueError(f"{argument}: empty pattern ''. {_RULES_HINT}")
    if is_plain_pattern(text):
        parts = tuple(text.split("."))
        if "" in parts:
            raise ValueError(
                f"{argument}: plain name {_q(text)} has an empty component (a leading, "
                f"trailing or doubled '.'). {_RULES_HINT}"
            )
        return _Pattern(text, float(rate), parts, None)
    try:
        regex = re.compile(text)
    except re.error as err:
        raise ValueError(
            f"{argument}: pattern {_q(text)} is not a plain name and not a valid regular "
            f"expression ({err}).{_glob_hint(text)} {_RULES_HINT}"
        ) from None
    return _Pattern(text, float(rate), None, regex)


def _plain_start(parts: tuple[str, ...], components: list[str]) -> int | None:
    """Index of the first component where ``parts`` occurs in ``components``, or None."""
    k = len(parts)
    for i in range(len(components) - k + 1):
        if components[i] == parts[0] and tuple(components[i : i + k]) == parts:
            return i
    return None


def _match_name(name: str, regexes: list[_Pattern], plains: list[_Pattern], argument: str) -> _Hits:
    """Every pattern matching one name; raises if matching regexes disagree on the rate."""
    components = name.split(".")
    plain = []
    for p in plains:
        start = _plain_start(p.parts or (), components)
        if start is not None:
            plain.append((p, start))
    regex = [p for p in regexes if p.regex is not None and p.regex.fullmatch(name)]
    if len({p.rate for p in regex}) > 1:
        listed = ", ".join(f"{_q(p.text)} (rate {p.rate:g})" for p in regex)
        raise ValueError(
            f"{argument}: regex patterns {listed} {'both' if len(regex) == 2 else 'all'} "
            f"match parameter {_q(name)} but give different rates; give them the same rate "
            f"or narrow all but one so they no longer match {_q(name)}."
        )
    return plain, regex


def _no_match_message(unmatched: list[_Pattern], names: list[str], argument: str) -> str:
    candidates = _candidate_names(names)
    # Module paths from the root, in model order: what a regex is matched against by mistake.
    modules = dict.fromkeys(
        ".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)
    )
    lines = []
    for p in unmatched:
        line = f"  {_q(p.text)}"
        module = None
        if p.regex is not None:
            module = next((m for m in modules if p.regex.fullmatch(m)), None)
        if module is not None:
            suggestion = p.text + r"\..*"
            line += (
                f": matches the module {_q(module)}, but a regex must match whole parameter "
                f"names; try {_q(suggestion)}"
            )
        else:
            query = p.text if p.parts is not None else _regex_words(p.text)
            close = difflib.get_close_matches(query, candidates, n=3, cutoff=0.6) if query else []
            if close:
                line += ": closest names: " + ", ".join(_q(c) for c in close)
            else:
                tops = list(dict.fromkeys(n.split(".")[0] for n in names))
                line += ": no close name; top-level names: " + ", ".join(_q(t) for t in tops[:8])
        lines.append(line)
    what = "pattern matches" if len(unmatched) == 1 else "patterns match"
    return (
        f"{argument}: {len(unmatched)} {what} no parameter name:\n"
        + "\n".join(lines)
        + f"\n{_RULES_HINT}"
    )


def _untrained_message(
    untrained: list[_Pattern],
    tensors: Iterable[tuple[torch.Tensor, list[str]]],
    hits_per_tensor: list[list[_Hits]],
    argument: str,
) -> str:
    lines = []
    for p in untrained:
        example = next(
            names[i]
            for (_, names), hits in zip(tensors, hits_per_tensor, strict=True)
            for i, (plain, regex) in enumerate(hits)
            if any(q is p for q in regex) or any(q is p for q, _ in plain)
        )
        lines.append(f"  {_q(p.text)}: e.g. {_q(example)}")
    what = "pattern matches" if len(untrained) == 1 else "patterns match"
    return (
        f"{argument}: {len(untrained)} {what} only parameters that do not train (frozen with "
        "requires_grad=False, as a frozen backbone or PEFT base weights are, or not in the "
        "optimizer), so DropGrad would never mask them:\n"
        + "\n".join(lines)
        + "\nRemove the pattern, or point it at parameters that train."
    )


def _candidate_names(names: list[str]) -> list[str]:
    """Every dotted sub-path of every name: what a plain name could have meant."""
    seen: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            for j in range(i + 1, len(parts) + 1):
                seen.setdefault(".".join(parts[i:j]), None)
    return list(seen)


def _regex_words(pattern: str) -> str:
    """The literal name a regex seems to be about: ``'.*SelfAtention.*'`` -> ``'SelfAtention'``."""
    text = re.sub(r"\(\?[a-zA-Z]+\)", "", pattern)
    text = re.sub(r"\.[*+?]|\\.", lambda m: "." if m.group() == r"\." else "", text)
    return re.sub(r"[^\w.]", "", text).strip(".")


def _glob_hint(pattern: str) -> str:
    if "*" not in pattern:
        return ""
    suggestion = re.sub(r"(?<!\.)\*", ".*", pattern)
    try:
        re.compile(suggestion)
    except re.error:
        return ""
    return f" Glob wildcards are not supported: for '*' write '.*', e.g. {_q(suggestion)}."


def _q(text: str) -> str:
    """Quote a name or pattern for a message; unlike repr, leaves backslashes single."""
    return f"'{text}'"


def _fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:g}"


def _align(table: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return [
        "  ".join(
            cell.rjust(w) if c in right else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    ]

"""What the Trainer examples share: argument parsing, logging set-up and the final summary.

``run_seq2seq.py`` and ``run_classification.py`` import it as a sibling module (Python puts
a script's own folder first on ``sys.path``), as they import ``offline_data``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments

from hf_dropgrad import get_dropgrad

__all__ = [
    "clip",
    "describe_rates",
    "fmt",
    "parse_arguments",
    "print_summary",
    "setup_logging",
]

WIDTH = 78


def parse_arguments(
    dataclass_types: Sequence[type], defaults: dict[str, Any], argv: Sequence[str] | None = None
) -> tuple[Any, ...]:
    """Parse the command line (or a single JSON/YAML file) into ``dataclass_types``.

    Args:
        dataclass_types: the argument classes, the training arguments last.
        defaults: the script's defaults, applied to whatever the command line or the file
            leaves out.
        argv: the arguments, without the program name; defaults to ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(tuple(dataclass_types))
    # On a machine with no GPU (or other accelerator), `use_cpu` is what makes the Trainer
    # start a gloo process group under `accelerate launch`/`torchrun`, so that the processes
    # train as one DDP job instead of as independent copies; alone, it changes nothing.
    defaults = dict(defaults, use_cpu=not torch.accelerator.is_available())
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        text = Path(argv[0]).read_text()
        if argv[0].endswith(".json"):
            config = json.loads(text)
        else:
            import yaml  # PyYAML, as in HfArgumentParser.parse_yaml_file

            config = yaml.safe_load(text)
        return parser.parse_dict({**defaults, **config})
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(training_args: TrainingArguments, logger: logging.Logger) -> None:
    """Log like Transformers' examples: INFO on the main process, warnings on the others.

    ``--log_level`` / ``--log_level_replica`` override that, for the script's logger, datasets
    and transformers (DropGrad's rate table included).
    """
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)


def fmt(value: float | None, percent: bool = False) -> str:
    """A metric for the summary table; ``-`` when missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _count(number: int) -> str:
    return f"{number / 1e6:.1f}M" if number >= 100_000 else f"{number / 1e3:.1f}k"


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, with an ellipsis when cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def describe_rates(trainer: Any, training_args: Any) -> list[str]:
    """Lines saying which drop rate the optimizer applied to which top-level module."""
    dropgrad = get_dropgrad(trainer)
    if dropgrad is None:
        rates = dict(training_args.dropgrad_module_rates or {})
        return [f"configured (not applied): {rates}, default {training_args.dropgrad_rate}"]
    sizes = dict(trainer.model.named_parameters())
    groups: dict[tuple[str, float], list[int]] = {}
    for name, rate in dropgrad.current_rates().items():
        top = str(name).split(".", 1)[0]
        numel = sizes[name].numel() if name in sizes else 0
        groups.setdefault((top, float(rate)), []).append(numel)
    lines = [
        f"{top:<10} p = {rate:<5g} {len(numels):>4} tensors, {_count(sum(numels)):>6} elements"
        for (top, rate), numels in sorted(groups.items())
    ]
    if training_args.dropgrad_scheduler != "constant":
        lines.append(
            f"schedule {training_args.dropgrad_scheduler!r}; the rates above are those after the "
            "last step (its final values)"
        )
    return lines or ["none (every rate is 0)"]


def print_summary(
    title: str,
    metrics: Sequence[tuple[str, str, bool]],
    before: dict[str, float] | None,
    after: dict[str, float] | None,
    rate_lines: Sequence[str],
    extra_rows: Sequence[str] = (),
    examples: Sequence[str] = (),
) -> None:
    """Print the final table: metrics before/after, the drop rates and example predictions.

    Args:
        title: the first line.
        metrics: ``(label, key, percent)`` per metric row; ``key`` is an ``eval_*`` key.
        before: evaluation metrics before training, or ``None``.
        after: evaluation metrics after training, or ``None``.
        rate_lines: the lines of :func:`describe_rates`.
        extra_rows: lines printed under the metric rows (e.g. a baseline).
        examples: the example lines, header first, already formatted.
    """
    print("\n" + "=" * WIDTH)
    print(title)
    print("-" * WIDTH)
    print(f"{'':<24}{'before':>12}{'after':>12}")
    for label, key, percent in metrics:
        old, new = (before or {}).get(key), (after or {}).get(key)
        print(f"{label:<24}{fmt(old, percent):>12}{fmt(new, percent):>12}")
    for line in extra_rows:
        print(line)
    print("-" * WIDTH)
    print("DropGrad drop rates:")
    for line in rate_lines:
        print(f"  {line}")
    if examples:
        print("-" * WIDTH)
        for line in examples:
            print(line)
    print("=" * WIDTH)

"""Tuned against tuned: does DropGrad add anything once the learning rate is tuned?

The task of the overfitting-regime study (`studies/study_overfit.py`, docs/analysis.md §6):
the pretrained MiniLM-L6 learns to put a WordNet definition in one of 41 lexicographer
classes from 64 training examples in 12 epochs. Three disjoint splits: the training set (the
first 64 definitions of the example's training split), a **dev** split (the first
`--dev_samples` definitions of its validation split) that makes every choice, and a **test**
split (the next `--test_samples`) that only reports. Every run trains the full 12 epochs and
is scored once, at the end (no epoch is selected), on dev and on test.

Arms: the baseline (p = 0), DropGrad at p = 0.6 (Child-Tuning_F's operating point) and full
update drop at p = 0.5, each at every learning rate of `--learning_rates` and every seed; a
seed fixes the data order and the classification head's initialisation in every arm, so arms
are compared seed by seed. Each arm gets its own learning rate, the one with the best mean dev
accuracy (:func:`select_learning_rates`, which reads nothing but the dev accuracy); its test
accuracy there is compared, seed by seed, with the baseline's at the baseline's own choice.

Runs happen in-process (the classification example's `main(argv)`, unchanged flags, with its
own evaluation off; the saved model is then scored on dev and test here). Each finished run
is one row of `results.csv` in `--out` (default `docs/study/tuned`), which is the study's only
store: a rerun skips the rows already there, and `--report` rebuilds `summary.md` and the plot
from the CSV alone.

    nice -n 10 python -m studies.study_tuned --workers 2 --threads 1   # the study (analysis §8)
    python -m studies.study_tuned --report      # summary.md and the plot, from results.csv
    python -m studies.study_tuned --seeds 2 --epochs 1 --learning_rates 1e-3 5e-4 \\
        --max_train_samples 8 --dev_samples 8 --test_samples 8 --out /tmp/tuned  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from studies import study_harness as harness
from studies.study_harness import Config

TASK = "classification"

ARMS = [
    Config("baseline", ("--dropgrad_rate", "0")),
    Config("p=0.6", ("--dropgrad_rate", "0.6"), 0.6, "all"),
    Config("p=0.5 full update drop",
           ("--dropgrad_rate", "0.5", "--dropgrad_full_update_drop", "true"), 0.5, "all", True),
]
ARMS_BY_NAME = {arm.name: arm for arm in ARMS}
ARM_ORDER = {arm.name: i for i, arm in enumerate(ARMS)}
BASELINE = "baseline"

#: The documented study (the command line's defaults).
DEFAULTS: dict[str, Any] = {
    "seeds": 8,
    # The first two seeds also ran 1.25e-4 (every arm's worst, 3-10 points below 5e-4 on dev)
    # and put DropGrad's and full update drop's best dev accuracy at 1e-3, the grid's top
    # edge: the grid moved up one step so that it brackets every arm's best.
    "learning_rates": [2e-3, 1e-3, 5e-4, 2.5e-4],
    "epochs": 12,
    "max_train_samples": 64,
    "dev_samples": 300,
    "test_samples": 1000,
    "batch_size": 8,
    "max_seq_length": 24,
}
#: What may change between launches of one study: more seeds, another learning-rate grid
#: (rows at learning rates off the grid stay in results.csv and in the learning-rate table,
#: but take no part in the choice of learning rate).
GROWABLE = ("seeds", "learning_rates")

CSV_FIELDS = [
    "task", "arm", "learning_rate", "seed", "drop_rate", "full_update_drop",
    "dev_accuracy", "test_accuracy", "dev_loss", "test_loss", "final_train_loss",
    "epochs", "steps", "seconds",
]
FIELD_TYPES = {
    "learning_rate": float, "seed": int, "drop_rate": float, "full_update_drop": bool,
    "dev_accuracy": float, "test_accuracy": float, "dev_loss": float, "test_loss": float,
    "final_train_loss": float, "epochs": int, "steps": int, "seconds": float,
}


def run_argv(arm: Config, learning_rate: float, seed: int, args: argparse.Namespace,
             output_dir: Path) -> list[str]:
    """The classification example's command line for one run: train only (the study scores
    the saved model itself, on two splits)."""
    return [
        "--output_dir", str(output_dir), "--seed", str(seed),
        "--do_eval", "false", "--eval_strategy", "no",
        "--max_steps", "-1", "--num_train_epochs", str(args.epochs),
        "--max_train_samples", str(args.max_train_samples),
        "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", repr(learning_rate),
        "--warmup_steps", "0.1",
        "--max_seq_length", str(args.max_seq_length),
        "--logging_strategy", "epoch", "--save_strategy", "no",
        "--eval_before_training", "false", "--num_example_predictions", "0",
        "--report_to", "none", "--disable_tqdm", "true", "--log_level", "warning",
        *arm.flags,
    ]


# ---------------------------------------------------------------- the splits


def eval_splits(dev_samples: int, test_samples: int) -> dict[str, list[dict]]:
    """The dev and test definitions: consecutive, disjoint slices of the example's validation
    split (whose training split the runs train on), dev first."""
    offline_data = harness.load_example("offline_data")
    files = offline_data.extract_wordnet(root=offline_data.cache_dir() / "data")
    with open(files["validation"], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    if dev_samples + test_samples > len(rows):
        raise ValueError(f"--dev_samples + --test_samples must be at most {len(rows)} (the "
                         f"validation split), got {dev_samples} + {test_samples}")
    return {"dev": rows[:dev_samples], "test": rows[dev_samples:dev_samples + test_samples]}


_ENCODED: dict[tuple, dict[str, Any]] = {}


def _encoded(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Dev and test, tokenized once per process: per split, padded batches of input ids and
    the label names."""
    key = (args.dev_samples, args.test_samples, args.max_seq_length)
    if key not in _ENCODED:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        encoded = {}
        for split, rows in eval_splits(args.dev_samples, args.test_samples).items():
            ids = tokenizer([r["text"] for r in rows], max_length=args.max_seq_length,
                            truncation=True)["input_ids"]
            order = sorted(range(len(rows)), key=lambda i: len(ids[i]))  # less padding
            batches = []
            for start in range(0, len(order), 128):
                chunk = order[start:start + 128]
                batch = tokenizer.pad({"input_ids": [ids[i] for i in chunk]},
                                      return_tensors="pt")
                batches.append((batch, [rows[i]["label"] for i in chunk]))
            encoded[split] = batches
        _ENCODED[key] = encoded
    return _ENCODED[key]


def score(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Accuracy (percent) and mean cross-entropy of the saved model on dev and on test."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    label2id = model.config.label2id
    out = {}
    with torch.inference_mode():
        for split, batches in _encoded(model_dir, args).items():
            correct, loss, count = 0, 0.0, 0
            for batch, names in batches:
                labels = torch.tensor([label2id[name] for name in names])
                logits = model(**batch).logits
                correct += int((logits.argmax(-1) == labels).sum())
                loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                count += len(names)
            out[f"{split}_accuracy"] = 100 * correct / count
            out[f"{split}_loss"] = loss / count
    return out


# ---------------------------------------------------------------- one run


def verify_run(arm: Config, learning_rate: float, output_dir: Path,
               log_history: list[dict]) -> None:
    """Fail loudly when a run trained with other settings than its arm and learning rate."""
    import torch

    harness.check_rates(arm, log_history, output_dir)
    training_args = torch.load(output_dir / "training_args.bin", weights_only=False)
    trained = (training_args.learning_rate, training_args.dropgrad_full_update_drop)
    if trained != (learning_rate, arm.full_update_drop):
        raise RuntimeError(f"{output_dir}: {arm.name!r} at learning rate {learning_rate:g} "
                           f"trained with (learning rate, full update drop) = {trained}")


def train_one(arm: Config, learning_rate: float, seed: int, args: argparse.Namespace,
              log: IO[str]) -> dict:
    """Train one (arm, learning rate, seed) in this process, score it, return its row."""

    def read(output_dir: Path, history: list[dict]) -> dict[str, float]:
        verify_run(arm, learning_rate, output_dir, history)
        return score(output_dir, args)

    run = harness.run_example(
        "run_classification",
        lambda output_dir: run_argv(arm, learning_rate, seed, args, output_dir),
        read, log, args.scratch, prefix="tuned_")
    history, scores = run.history, run.result
    losses = [e["loss"] for e in history if "loss" in e]
    return {
        "task": TASK, "arm": arm.name, "learning_rate": learning_rate, "seed": seed,
        "drop_rate": arm.rate, "full_update_drop": arm.full_update_drop,
        **{key: round(value, 4) for key, value in scores.items()},
        "final_train_loss": round(losses[-1], 4) if losses else None,
        "epochs": args.epochs, "steps": max((e.get("step", 0) for e in history), default=0),
        "seconds": round(run.seconds, 1),
    }


# ---------------------------------------------------------------- selection and report


def dev_curve(rows: Sequence[Mapping[str, Any]], arm: str) -> dict[float, float]:
    """Mean dev accuracy per learning rate of one arm. Reads only `arm`, `learning_rate` and
    `dev_accuracy` of each row."""
    by_rate: dict[float, list[float]] = {}
    for row in rows:
        if row["arm"] == arm:
            by_rate.setdefault(row["learning_rate"], []).append(row["dev_accuracy"])
    return {rate: statistics.fmean(values) for rate, values in by_rate.items()}


def select_learning_rates(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each arm's learning rate: the best mean dev accuracy (on a tie, the larger rate).
    The test split plays no part: only `dev_curve` reads the rows."""
    chosen = {}
    for arm in dict.fromkeys(row["arm"] for row in rows):
        curve = dev_curve(rows, arm)
        chosen[arm] = max(curve, key=lambda rate: (curve[rate], rate))
    return chosen


def _by_seed(rows: Sequence[Mapping[str, Any]], arm: str, rate: float, key: str) -> dict:
    return {r["seed"]: r[key] for r in rows if r["arm"] == arm and r["learning_rate"] == rate}


def comparison(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per arm: its chosen learning rate, dev and test accuracy there (mean ± sd), and its
    test (and dev) accuracy paired by seed with the baseline at the baseline's own choice."""
    chosen = select_learning_rates(rows)
    out = []
    for arm in sorted(chosen, key=lambda name: ARM_ORDER.get(name, 99)):
        rate = chosen[arm]
        entry = {"arm": arm, "learning_rate": rate}
        for split in ("dev", "test"):
            values = _by_seed(rows, arm, rate, f"{split}_accuracy")
            entry[split] = harness.mean_sd(list(values.values()))
            entry["n"] = len(values)
            if BASELINE in chosen:
                base = _by_seed(rows, BASELINE, chosen[BASELINE], f"{split}_accuracy")
                entry[f"paired_{split}"] = harness.paired(values, base)
        out.append(entry)
    return out


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| arm | learning rate (best mean dev) | runs | dev accuracy % (mean ± sd) | "
        "test accuracy % (mean ± sd) | paired Δ test vs tuned baseline (± s.e.) | "
        "seeds better / worse | paired Δ dev (± s.e.) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in comparison(rows):
        cells = [entry["arm"], f"{entry['learning_rate']:g}", str(entry["n"]),
                 f"{harness.fmt(entry['dev'][0])} ± {harness.fmt(entry['dev'][1])}",
                 f"{harness.fmt(entry['test'][0])} ± {harness.fmt(entry['test'][1])}"]
        test, dev = entry.get("paired_test"), entry.get("paired_dev")
        if entry["arm"] == BASELINE or test is None:
            cells += ["—", "—", "—"]
        else:
            cells += [f"{harness.fmt(test.mean, sign=True)} ± {harness.fmt(test.se)}",
                      f"{test.better} / {test.worse} of {test.n}",
                      f"{harness.fmt(dev.mean, sign=True)} ± {harness.fmt(dev.se)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rate_table(rows: Sequence[Mapping[str, Any]], chosen: Mapping[str, float]) -> str:
    """The whole curve: per arm and learning rate, dev and test accuracy (mean ± sd), and the
    test accuracy paired with the baseline at the same learning rate; `chosen` marked."""
    lines = [
        "| arm | learning rate | runs | dev accuracy % | test accuracy % | "
        "paired Δ test vs baseline, same rate (± s.e.) | final train loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rates = sorted({r["learning_rate"] for r in rows}, reverse=True)
    for arm in sorted({r["arm"] for r in rows}, key=lambda name: ARM_ORDER.get(name, 99)):
        for rate in rates:
            mine = [r for r in rows if r["arm"] == arm and r["learning_rate"] == rate]
            if not mine:
                continue
            dev = harness.mean_sd([r["dev_accuracy"] for r in mine])
            test = harness.mean_sd([r["test_accuracy"] for r in mine])
            mark = " **(chosen)**" if rate == chosen.get(arm) else ""
            if arm == BASELINE:
                delta = "—"
            else:
                d = harness.paired(_by_seed(rows, arm, rate, "test_accuracy"),
                                   _by_seed(rows, BASELINE, rate, "test_accuracy"))
                delta = f"{harness.fmt(d.mean, sign=True)} ± {harness.fmt(d.se)}"
            losses = [r["final_train_loss"] for r in mine if r["final_train_loss"] is not None]
            lines.append(
                f"| {arm} | {rate:g}{mark} | {len(mine)} | {harness.fmt(dev[0])} ± "
                f"{harness.fmt(dev[1])} | {harness.fmt(test[0])} ± {harness.fmt(test[1])} | "
                f"{delta} | {harness.fmt(harness.mean_sd(losses)[0], 3)} |")
    return "\n".join(lines)


def complete_seeds(rows: Sequence[Mapping[str, Any]], learning_rates: Sequence[float],
                   arms: Sequence[str]) -> set[int]:
    """The seeds that have a run of every arm at every learning rate of the grid: while a
    study is under way, only these enter the choice, so every learning rate of every arm is
    judged on the same seeds."""
    have = {(r["arm"], r["learning_rate"], r["seed"]) for r in rows}
    return {seed for seed in {r["seed"] for r in rows}
            if all((arm, rate, seed) in have for arm in arms for rate in learning_rates)}


def missing_runs(rows: Sequence[Mapping[str, Any]], seeds: int,
                 learning_rates: Sequence[float]) -> int:
    have = {(r["arm"], r["learning_rate"], r["seed"]) for r in rows}
    return sum(1 for arm in ARMS for rate in learning_rates for seed in range(seeds)
               if (arm.name, rate, seed) not in have)


def plot(rows: Sequence[Mapping[str, Any]], out: Path) -> Path:
    plt = harness.pyplot()

    chosen = select_learning_rates(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, split in zip(axes, ("dev", "test")):
        for i, arm in enumerate(sorted(chosen, key=lambda name: ARM_ORDER.get(name, 99))):
            rates = sorted({r["learning_rate"] for r in rows if r["arm"] == arm})
            stats = [harness.mean_se([r[f"{split}_accuracy"] for r in rows
                                      if r["arm"] == arm and r["learning_rate"] == rate])
                     for rate in rates]
            shift = 1 + 0.03 * (i - 1)  # side by side on the log axis
            line = ax.errorbar([rate * shift for rate in rates], [m for m, _ in stats],
                               yerr=[0 if math.isnan(se) else 2 * se for _, se in stats],
                               marker="o", capsize=3, label=arm)
            best = rates.index(chosen[arm])
            ax.plot([rates[best] * shift], [stats[best][0]], marker="*", markersize=16,
                    color=line[0].get_color(), linestyle="none")
        harness.learning_rate_axis(ax, {r["learning_rate"] for r in rows})
        ax.set_title(f"{split} split: accuracy (mean ± 2 s.e. over seeds)", fontsize=10)
    axes[0].set_ylabel("accuracy, %")
    axes[0].legend(fontsize=8, title="★ = best mean dev accuracy", title_fontsize=8)
    fig.suptitle("MiniLM-L6, 64 WordNet definitions, 12 epochs: each arm at every learning rate",
                 fontsize=10)
    return harness.save_figure(fig, out / "accuracy_vs_learning_rate.png")


# ---------------------------------------------------------------- the study


class TunedStudy(harness.Study):
    """Tuned against tuned: each arm at every learning rate and seed, scored on dev and test."""

    module = "studies.study_tuned"
    out = "docs/study/tuned"
    defaults = DEFAULTS
    growable = GROWABLE
    arms = ARMS

    def check_arguments(self, args: argparse.Namespace) -> None:
        for name in ("seeds", "epochs", "max_train_samples", "dev_samples", "test_samples",
                     "batch_size", "max_seq_length"):
            if getattr(args, name) < 1:
                raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")
        if any(not rate > 0 for rate in args.learning_rates):
            raise SystemExit(f"--learning_rates must be positive, got {args.learning_rates}")

    def grown(self, args: argparse.Namespace, old: Mapping[str, Any]) -> dict[str, Any]:
        return {"seeds": max(args.seeds, old.get("seeds", 0)),
                "learning_rates": sorted(args.learning_rates, reverse=True)}

    def store(self, out: Path) -> harness.ResultStore:
        """The study's rows: `results.csv` alone, one row per (arm, learning rate, seed)."""
        return harness.ResultStore(
            out, ("arm", "learning_rate", "seed"), CSV_FIELDS,
            sort_key=lambda r: (r["seed"], -r["learning_rate"], ARM_ORDER.get(r["arm"], 99)),
            keep_json=False, field_types=FIELD_TYPES,
        )

    def jobs(self, args: argparse.Namespace) -> Iterator[harness.Job]:
        """Seed-major, then learning rate, then arm: a cut-short study stays paired."""
        arms = self.selected_arms(args)
        for seed in range(args.seeds):
            for learning_rate in args.learning_rates:
                for arm in arms:
                    yield harness.Job(
                        (arm.name, learning_rate, seed), f"{arm.name:>22} lr {learning_rate:<8g} "
                        f"seed {seed}",
                        lambda log, a=arm, lr=learning_rate, s=seed: train_one(a, lr, s, args, log),
                    )

    def describe(self, row: dict) -> str:
        return (f"dev {row['dev_accuracy']:.1f}%, test {row['test_accuracy']:.1f}%, "
                f"train loss {row['final_train_loss']:.3f} ({row['seconds']:.0f} s)")

    def report(self, out: Path, meta: Mapping[str, Any]) -> str:
        """summary.md (and the plot), computed from `results.csv` alone."""
        rows = self.store(out).load()
        settings = meta.get("settings", {key: DEFAULTS[key] for key in DEFAULTS
                                         if key not in GROWABLE})
        seeds = meta.get("seeds", DEFAULTS["seeds"])
        rates = meta.get("learning_rates", DEFAULTS["learning_rates"])
        missing = missing_runs(rows, seeds, rates)
        seconds = [r["seconds"] for r in rows]
        on_grid = [r for r in rows if r["learning_rate"] in rates]
        seeds_in = complete_seeds(rows, rates, sorted({r["arm"] for r in on_grid}))
        # the choice is made on the grid, over the seeds that have every run of it
        grid = [r for r in on_grid if r["seed"] in seeds_in]
        off_grid = sorted({r["learning_rate"] for r in rows} - set(rates), reverse=True)
        parts = [
            "# Tuned against tuned (generated by studies/study_tuned.py)\n",
            f"Command: `{meta.get('command', 'python -m studies.study_tuned')}`; this file and the "
            "plot, recomputed from results.csv: `python -m studies.study_tuned --report`.\n",
            f"Task: {TASK} (pretrained MiniLM-L6, WordNet definitions → 41 lexicographer classes), "
            f"{settings['max_train_samples']} training examples, {settings['epochs']} epochs at "
            f"batch {settings['batch_size']} (AdamW, 10 % warm-up, linear decay), inputs truncated "
            f"to {settings['max_seq_length']} tokens. Splits: dev = the first "
            f"{settings['dev_samples']} definitions of the validation split (chooses each arm's "
            f"learning rate), test = the next {settings['test_samples']} (reports only). Every "
            "run is scored once, after its last epoch. Learning rates "
            f"{', '.join(f'{rate:g}' for rate in rates)}; seeds 0 to {seeds - 1}.\n",
            f"Runs: {len(on_grid)} of {seeds * len(rates) * len(ARMS)} on the grid"
            + (f" and {len(rows) - len(on_grid)} at learning rates off it "
               f"({', '.join(f'{rate:g}' for rate in off_grid)}: listed in the learning-rate "
               "table, no part in the choice)" if off_grid else "") + ", "
            f"{sum(seconds) / 60:.1f} min of training and scoring in all "
            f"({statistics.median(seconds) if seconds else 0:.0f} s median per run).\n",
            (f"**{missing} runs missing** (the study is incomplete; rerun its command to resume). "
             f"The choice of learning rate and the comparison below use the {len(seeds_in)} seeds "
             f"that have every run of the grid ({', '.join(map(str, sorted(seeds_in)))}); the "
             "learning-rate table shows every run.\n"
             if missing else "All runs finished.\n"),
            "Accuracies in percent. Paired Δ: per-seed difference to the baseline of the same "
            "seed, mean ± standard error; seeds better / worse: in how many seeds the arm beat / "
            "lost to the baseline (the rest tied).\n",
            "## Each arm at its own best learning rate (chosen on dev), against the tuned "
            "baseline\n",
            comparison_table(grid) + "\n" if grid else "(no runs yet)\n",
            "## Accuracy against the learning rate\n",
            rate_table(rows, select_learning_rates(grid)) + "\n" if rows else "(no runs yet)\n",
        ]
        if grid:
            parts.append(f"![accuracy vs learning rate]({plot(grid, out).name})\n")
        text = "\n".join(parts)
        harness.atomic_write(out / "summary.md", text)
        return text


STUDY = TunedStudy()
main = STUDY.main

if __name__ == "__main__":
    main()

"""Overfitting-regime study: does DropGrad regularise a small model on a small training set?

The classification example (pretrained MiniLM-L6, WordNet definitions → 41 lexicographer
classes, offline) is trained on a small training subset for many epochs, until the baseline
overfits (training loss near zero, eval loss rising), and evaluated after every epoch. Arms:
the baseline (DropGrad off), DropGrad at the rates users pick (p = 0.1, 0.3, 0.5) and at
Child-Tuning_F's operating point (p = 0.6, 0.7, 0.8; Child-Tuning_F with keep probability
p_F is DropGrad inside AdamW with p = 1 - p_F), full update drop at one rate, and the
regularisers a user would otherwise reach for: a higher weight decay and higher model dropout;
and a control for DropGrad's smaller effective AdamW step, the baseline at half the learning
rate. Every arm runs the same seeds; a seed fixes the data order and the initialisation of the
classification head in every arm, so arms are compared with the baseline seed by seed.

Runs happen in-process (the example's `main(argv)`, unchanged flags), which saves the 5-10 s
of importing transformers per run; `--workers N` runs N such processes, each taking the next
free run (the pool, the results store and the statistics are `studies/study_harness.py`'s).
After each run its row is appended to `results.json` / `results.csv` in `--out` (default
`docs/study/overfit`), atomically, so an interrupted study resumes where it stopped: runs
already there are skipped. Every run is checked against its arm: the drop rates the
DropGrad callback logged, and the weight decay, full-update-drop flag, learning rate and model
dropout the run actually trained with.

    nice -n 10 python -m studies.study_overfit --seeds 12 --workers 3 --threads 1  # analysis §6
    python -m studies.study_overfit --report         # rebuild summary.md and plots only
    python -m studies.study_overfit --seeds 2 --epochs 1 --max_train_samples 8 \\
        --max_eval_samples 8 --out /tmp/overfit      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from studies import study_harness as harness
from studies.study_harness import Config, check_rates

TASK = "classification"
METRIC = "eval_accuracy"  # higher is better
#: MiniLM-L6's own dropout (hidden and attention) and the example's weight decay.
DEFAULT_MODEL_DROPOUT = 0.1
DEFAULT_WEIGHT_DECAY = 0.01
HIGH_WEIGHT_DECAY = 0.1
HIGH_MODEL_DROPOUT = 0.2
#: Under AdamW, DropGrad at rate p shrinks the expected step by about sqrt(1 - p)
#: (docs/analysis.md §1), so a plain smaller learning rate is the control that separates
#: "regularisation" from "a smaller step": half the study's rate, the shrink at p = 0.75.
LOW_LEARNING_RATE_FACTOR = 0.5
FULL_UPDATE_DROP_RATE = 0.5


@dataclass(frozen=True)
class Arm:
    """One arm: a name, the example's flags, and what it changes against the baseline."""

    name: str
    flags: tuple[str, ...]
    drop_rate: float = 0.0
    full_update_drop: bool = False
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    model_dropout: float = DEFAULT_MODEL_DROPOUT
    learning_rate_factor: float = 1.0  # times the study's --learning_rate
    kind: str = "dropgrad"  # "baseline", "dropgrad", "full update drop", "alternative"

    @property
    def config(self) -> Config:
        """The :class:`~studies.study_harness.Config` whose rate check this arm reuses."""
        return Config(self.name, self.flags, self.drop_rate, "all" if self.drop_rate else "none",
                      self.full_update_drop)


def _dropgrad(rate: float) -> Arm:
    return Arm(f"p={rate:g}", ("--dropgrad_rate", f"{rate:g}"), rate)


# The example applies DropGrad (p = 0.1) by default, so every arm without DropGrad passes
# `--dropgrad_rate 0` explicitly; `verify_run` checks what each run actually trained with.
ARMS = [
    Arm("baseline", ("--dropgrad_rate", "0"), kind="baseline"),
    *(_dropgrad(rate) for rate in (0.1, 0.3, 0.5, 0.6, 0.7, 0.8)),
    Arm(
        f"p={FULL_UPDATE_DROP_RATE:g} full update drop",
        ("--dropgrad_rate", f"{FULL_UPDATE_DROP_RATE:g}", "--dropgrad_full_update_drop", "true"),
        FULL_UPDATE_DROP_RATE, full_update_drop=True, kind="full update drop",
    ),
    Arm(
        f"weight decay {HIGH_WEIGHT_DECAY:g}",
        ("--dropgrad_rate", "0", "--weight_decay", f"{HIGH_WEIGHT_DECAY:g}"),
        weight_decay=HIGH_WEIGHT_DECAY, kind="alternative",
    ),
    Arm(
        f"model dropout {HIGH_MODEL_DROPOUT:g}",
        ("--dropgrad_rate", "0", "--config_overrides",
         f"hidden_dropout_prob={HIGH_MODEL_DROPOUT:g},"
         f"attention_probs_dropout_prob={HIGH_MODEL_DROPOUT:g}"),
        model_dropout=HIGH_MODEL_DROPOUT, kind="alternative",
    ),
    Arm(
        f"learning rate x{LOW_LEARNING_RATE_FACTOR:g}", ("--dropgrad_rate", "0"),
        learning_rate_factor=LOW_LEARNING_RATE_FACTOR, kind="alternative",
    ),
]
ARMS_BY_NAME = {arm.name: arm for arm in ARMS}
ARM_ORDER = {arm.name: i for i, arm in enumerate(ARMS)}

#: The documented study's settings (the defaults of the command line).
DEFAULTS = {
    "seeds": 8,
    "epochs": 12,
    "max_train_samples": 64,
    "max_eval_samples": 150,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "max_seq_length": 24,
}

CSV_FIELDS = [
    "task", "arm", "seed", "drop_rate", "full_update_drop", "weight_decay", "model_dropout",
    "best_eval_accuracy", "best_epoch", "final_eval_accuracy", "final_eval_loss",
    "min_eval_loss", "min_eval_loss_epoch", "final_train_loss", "epochs", "steps", "seconds",
]


def run_argv(arm: Arm, seed: int, args: argparse.Namespace, output_dir: Path) -> list[str]:
    """The example's command line for one (arm, seed)."""
    return [
        "--output_dir", str(output_dir), "--seed", str(seed),
        "--max_steps", "-1", "--num_train_epochs", str(args.epochs),
        "--max_train_samples", str(args.max_train_samples),
        "--max_eval_samples", str(args.max_eval_samples),
        "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate * arm.learning_rate_factor),
        "--warmup_steps", "0.1",
        "--max_seq_length", str(args.max_seq_length),
        "--eval_strategy", "epoch", "--logging_strategy", "epoch", "--save_strategy", "no",
        "--eval_before_training", "false", "--num_example_predictions", "0",
        "--report_to", "none", "--disable_tqdm", "true", "--log_level", "warning",
        *arm.flags,
    ]


def verify_run(arm: Arm, output_dir: Path, log_history: list[dict],
               learning_rate: float | None = None) -> None:
    """Fail loudly when a run trained with other settings than its arm names."""
    check_rates(arm.config, log_history, output_dir)  # the logged drop rates
    import torch

    training_args = torch.load(output_dir / "training_args.bin", weights_only=False)
    config = json.loads((output_dir / "config.json").read_text())
    trained = {
        "weight_decay": training_args.weight_decay,
        "full_update_drop": training_args.dropgrad_full_update_drop,
        "model_dropout": (config["hidden_dropout_prob"], config["attention_probs_dropout_prob"]),
    }
    wanted = {
        "weight_decay": arm.weight_decay,
        "full_update_drop": arm.full_update_drop,
        "model_dropout": (arm.model_dropout, arm.model_dropout),
    }
    if learning_rate is not None:
        trained["learning_rate"] = training_args.learning_rate
        wanted["learning_rate"] = learning_rate * arm.learning_rate_factor
    if trained != wanted:
        raise RuntimeError(f"{output_dir}: arm {arm.name!r} wants {wanted}, the run used {trained}")


def epoch_curve(log_history: list[dict]) -> list[dict]:
    """Per epoch: training loss (mean over the epoch), eval loss and eval accuracy."""
    by_epoch: dict[float, dict] = {}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        epoch = round(float(entry["epoch"]), 3)
        point = by_epoch.setdefault(epoch, {"epoch": epoch})
        if "loss" in entry:
            point["train_loss"] = entry["loss"]
        if "eval_loss" in entry and "eval_loss" not in point:  # the example re-logs the last
            point["eval_loss"] = entry["eval_loss"]
            point[METRIC] = entry[METRIC]
    return [p for _, p in sorted(by_epoch.items()) if METRIC in p]


def summarise_run(arm: Arm, seed: int, log_history: list[dict], seconds: float) -> dict:
    curve = epoch_curve(log_history)
    best = max(curve, key=lambda p: p[METRIC])  # the first epoch reaching the maximum
    low = min(curve, key=lambda p: p["eval_loss"])
    train = [p for p in curve if "train_loss" in p]
    steps = max((e.get("step", 0) for e in log_history), default=0)
    return {
        "task": TASK, "arm": arm.name, "seed": seed, "drop_rate": arm.drop_rate,
        "full_update_drop": arm.full_update_drop, "weight_decay": arm.weight_decay,
        "model_dropout": arm.model_dropout,
        "best_eval_accuracy": best[METRIC], "best_epoch": best["epoch"],
        "final_eval_accuracy": curve[-1][METRIC], "final_eval_loss": curve[-1]["eval_loss"],
        "min_eval_loss": low["eval_loss"], "min_eval_loss_epoch": low["epoch"],
        "final_train_loss": train[-1]["train_loss"] if train else None,
        "epochs": len(curve), "steps": steps, "seconds": round(seconds, 1), "curve": curve,
    }


def train_one(arm: Arm, seed: int, args: argparse.Namespace, log: IO[str]) -> dict:
    """Train one (arm, seed) in this process and return its row."""

    def read(output_dir: Path, history: list[dict]) -> None:
        verify_run(arm, output_dir, history, args.learning_rate)

    run = harness.run_example("run_classification",
                              lambda output_dir: run_argv(arm, seed, args, output_dir),
                              read, log, args.scratch, prefix="overfit_")
    return summarise_run(arm, seed, run.history, run.seconds)


# ---------------------------------------------------------------- report


mean_sd = harness.mean_sd


def paired(rows: list[dict], arm: str, key: str, lower_is_better: bool = False,
           reference: str = "baseline") -> harness.Paired:
    """Per-seed differences arm - reference: (mean, s.e., seeds better, worse, compared)."""
    return harness.paired({r["seed"]: r[key] for r in rows if r["arm"] == arm},
                          {r["seed"]: r[key] for r in rows if r["arm"] == reference},
                          lower_is_better)


def pts(value: float) -> str:
    """An accuracy (fraction) in percentage points."""
    return "—" if math.isnan(value) else f"{100 * value:.1f}"


def delta_cell(rows: list[dict], arm: str, key: str) -> tuple[str, str]:
    m, se, better, worse, n = paired(rows, arm, key)
    if n == 0:
        return "—", "—"
    se_text = "—" if math.isnan(se) else f"{100 * se:.1f}"
    return f"{100 * m:+.1f} ± {se_text}", f"{better}/{n} (worse {worse})"


def results_table(rows: list[dict]) -> str:
    lines = [
        "| arm | runs | best-epoch accuracy % (mean ± sd) | paired Δ best (± s.e.) | "
        "seeds better | final accuracy % (mean ± sd) | paired Δ final (± s.e.) | "
        "seeds better | final eval loss | min eval loss | final train loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm.name]
        if not mine:
            continue
        cells = [arm.name, str(len(mine))]
        for key in ("best_eval_accuracy", "final_eval_accuracy"):
            m, sd = mean_sd([r[key] for r in mine])
            cells.append(f"{pts(m)} ± {pts(sd)}")
            if arm.name == "baseline":
                cells += ["—", "—"]
            else:
                cells += list(delta_cell(rows, arm.name, key))
        for key in ("final_eval_loss", "min_eval_loss", "final_train_loss"):
            m, _ = mean_sd([r[key] for r in mine if r[key] is not None])
            cells.append(f"{m:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def control_table(rows: list[dict]) -> str:
    """Each DropGrad arm against the smaller-learning-rate control, seed by seed."""
    control = f"learning rate x{LOW_LEARNING_RATE_FACTOR:g}"
    if not _count(rows, control):
        return "(no runs of the learning-rate control yet)"
    lines = [
        f"| arm | paired Δ best accuracy vs {control} (± s.e.) | seeds better | "
        f"paired Δ final accuracy vs {control} (± s.e.) | seeds better |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm in ARMS:
        if arm.kind not in ("dropgrad", "full update drop") or not _count(rows, arm.name):
            continue
        cells = [arm.name]
        for key in ("best_eval_accuracy", "final_eval_accuracy"):
            m, se, better, worse, n = paired(rows, arm.name, key, reference=control)
            se_text = "—" if math.isnan(se) else f"{100 * se:.1f}"
            cells += [f"{100 * m:+.1f} ± {se_text}", f"{better}/{n} (worse {worse})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_curve(rows: list[dict], arm: str) -> list[dict]:
    curves = [r["curve"] for r in rows if r["arm"] == arm]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    out = []
    for i in range(n):
        point = {"epoch": curves[0][i]["epoch"]}
        for key in ("train_loss", "eval_loss", METRIC):
            values = [c[i][key] for c in curves if key in c[i]]
            point[key] = statistics.fmean(values) if values else math.nan
        out.append(point)
    return out


def curve_table(rows: list[dict], arm: str = "baseline") -> str:
    curve = mean_curve(rows, arm)
    n = sum(1 for r in rows if r["arm"] == arm)
    lines = [
        f"| epoch | training loss | eval loss | eval accuracy % |  ({arm}, {n} seeds)",
        "| --- | --- | --- | --- |",
    ]
    lines[0] = "| epoch | training loss | eval loss | eval accuracy % |"
    for p in curve:
        lines.append(f"| {p['epoch']:g} | {p['train_loss']:.3f} | {p['eval_loss']:.3f} | "
                     f"{pts(p[METRIC])} |")
    return "\n".join(lines)


def missing_runs(rows: list[dict], seeds: int) -> list[str]:
    """Per arm with runs missing: 'ARM (seeds a, b, ...)'."""
    have = {(r["arm"], r["seed"]) for r in rows}
    out = []
    for arm in ARMS:
        gone = [str(seed) for seed in range(seeds) if (arm.name, seed) not in have]
        if gone:
            out.append(f"{arm.name} (seed{'s' if len(gone) > 1 else ''} {', '.join(gone)})")
    return out


def loss_table(rows: list[dict]) -> str:
    """Paired differences of the eval loss (lower is better) and of the training loss."""
    lines = [
        "| arm | paired Δ final eval loss (± s.e.) | seeds lower | "
        "paired Δ min eval loss (± s.e.) | seeds lower | paired Δ final train loss (± s.e.) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm in ARMS[1:]:
        if not _count(rows, arm.name):
            continue
        cells = [arm.name]
        for key in ("final_eval_loss", "min_eval_loss", "final_train_loss"):
            m, se, lower, _, n = paired(rows, arm.name, key, lower_is_better=True)
            se_text = "—" if math.isnan(se) else f"{se:.3f}"
            cells.append(f"{m:+.3f} ± {se_text}")
            if key != "final_train_loss":
                cells.append(f"{lower}/{n}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metric_vs_rate(rows: list[dict], out: Path) -> Path:
    plt = harness.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, key, title in zip(axes, ("best_eval_accuracy", "final_eval_accuracy"),
                              ("best epoch", "final epoch")):
        line = [a for a in ARMS if a.kind in ("baseline", "dropgrad")]
        xs, ms, es = [], [], []
        for arm in line:
            m, se, *_ = paired(rows, arm.name, key) if arm.kind != "baseline" else (0, 0)
            if arm.kind != "baseline" and _count(rows, arm.name) == 0:
                continue
            xs.append(arm.drop_rate)
            ms.append(100 * m)
            es.append(0 if math.isnan(se) else 200 * se)
        ax.errorbar(xs, ms, yerr=es, marker="o", capsize=4, label="DropGrad (gradient mask)")
        others = [a for a in ARMS if a.kind in ("full update drop", "alternative")]
        markers = {"full update drop": "s", "alternative": "D"}
        for i, arm in enumerate(others):
            if _count(rows, arm.name) == 0:
                continue
            m, se, *_ = paired(rows, arm.name, key)
            x = arm.drop_rate + 0.015 if arm.full_update_drop else -0.05 * (len(others) - i)
            bar = ax.errorbar([x], [100 * m], yerr=[0 if math.isnan(se) else 200 * se],
                              marker=markers[arm.kind], capsize=4, linestyle="none",
                              label=arm.name)
            if arm.learning_rate_factor != 1:  # the smaller-step control, across the plot
                ax.axhline(100 * m, color=bar[0].get_color(), linestyle="--", linewidth=0.8)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("drop rate p (the alternatives, without DropGrad, left of p = 0)")
        ax.set_ylabel("Δ accuracy vs baseline, points")
        ax.set_title(f"{title}: paired Δ accuracy (mean ± 2 s.e.)", fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle("MiniLM-L6, WordNet definitions, overfitting regime", fontsize=10)
    return harness.save_figure(fig, out / "accuracy_vs_rate.png")


def _count(rows: list[dict], arm: str) -> int:
    return sum(1 for r in rows if r["arm"] == arm)


def plot_curves(rows: list[dict], out: Path) -> Path:
    plt = harness.pyplot()

    shown = ["baseline", "p=0.1", "p=0.3", "p=0.5", "p=0.7", "p=0.8",
             f"p={FULL_UPDATE_DROP_RATE:g} full update drop",
             f"weight decay {HIGH_WEIGHT_DECAY:g}", f"model dropout {HIGH_MODEL_DROPOUT:g}",
             f"learning rate x{LOW_LEARNING_RATE_FACTOR:g}"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for name in shown:
        curve = mean_curve(rows, name)
        if not curve:
            continue
        style = {"linewidth": 2.2, "color": "black"} if name == "baseline" else {}
        if name.startswith("learning rate"):
            style = {"linestyle": "--", "color": "black"}
        epochs = [p["epoch"] for p in curve]
        axes[0].plot(epochs, [p["train_loss"] for p in curve], label=name, **style)
        axes[1].plot(epochs, [p["eval_loss"] for p in curve], label=name, **style)
        axes[2].plot(epochs, [100 * p[METRIC] for p in curve], label=name, **style)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("training loss (epoch mean, log scale)")
    axes[1].set_ylabel("eval loss")
    axes[2].set_ylabel("eval accuracy, %")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[2].legend(fontsize=7)
    fig.suptitle("MiniLM-L6 on a small WordNet subset: learning curves, mean over seeds",
                 fontsize=10)
    return harness.save_figure(fig, out / "learning_curves.png")


# ---------------------------------------------------------------- the study


class OverfitStudy(harness.Study):
    """The overfitting regime: every arm at every seed, evaluated after every epoch."""

    module = "studies.study_overfit"
    out = "docs/study/overfit"
    defaults = DEFAULTS
    arms = ARMS

    def store(self, out: Path) -> harness.ResultStore:
        """The study's rows: `results.json` (with the per-epoch curves) and its flat view
        `results.csv`, one row per (arm, seed), seed-major."""
        return harness.ResultStore(
            out, ("arm", "seed"), CSV_FIELDS,
            sort_key=lambda r: (r["seed"], ARM_ORDER.get(r["arm"], len(ARM_ORDER))),
        )

    def jobs(self, args: argparse.Namespace) -> Iterator[harness.Job]:
        """Seed-major, arms in order: a cut-short study stays balanced."""
        arms = self.selected_arms(args)
        for seed in range(args.seeds):
            for arm in arms:
                yield harness.Job((arm.name, seed), f"{arm.name:>26} seed {seed}",
                                  lambda log, a=arm, s=seed: train_one(a, s, args, log))

    def describe(self, row: dict) -> str:
        return (f"best {100 * row['best_eval_accuracy']:.1f}% (epoch {row['best_epoch']:g}), "
                f"final {100 * row['final_eval_accuracy']:.1f}%, "
                f"train loss {row['final_train_loss']:.3f} ({row['seconds']:.0f} s)")

    def report(self, out: Path, meta: Mapping[str, Any]) -> str:
        """summary.md and the two plots, from `results.json` and `meta` alone."""
        rows = self.store(out).load()
        seeds = meta.get("seeds", DEFAULTS["seeds"])
        missing = missing_runs(rows, seeds)
        total = sum(r["seconds"] for r in rows)
        median = statistics.median([r["seconds"] for r in rows]) if rows else 0
        settings = meta.get("settings", {key: DEFAULTS[key] for key in DEFAULTS if key != "seeds"})
        parts = [
            "# Overfitting-regime study (generated by studies/study_overfit.py)\n",
            f"Command: `{meta.get('command', 'python -m studies.study_overfit')}`; this file and "
            "the plots: `python -m studies.study_overfit --report`.\n",
            f"Task: {TASK} (pretrained MiniLM-L6, WordNet definitions → 41 lexicographer classes). "
            f"Settings: {settings['max_train_samples']} training examples, "
            f"{settings['epochs']} epochs at batch {settings['batch_size']}, learning rate "
            f"{settings['learning_rate']:g} (AdamW, 10 % warm-up, linear decay), inputs truncated "
            f"to {settings['max_seq_length']} tokens, evaluation after every epoch on "
            f"{settings['max_eval_samples']} held-out definitions; seeds 0 to {seeds - 1}.\n",
            f"Runs: {len(rows)} of {seeds * len(ARMS)}, {total / 60:.1f} min of training and "
            f"evaluation in all ({median:.0f} s median per run).\n",
            ("**Missing runs** (the study is incomplete; rerun its command to resume): "
             + "; ".join(missing) + ".\n") if missing else "All runs finished.\n",
            "Accuracies in percent. Paired Δ: per-seed difference to the baseline of the same "
            "seed, mean ± standard error; seeds better: in how many seeds the arm beat the "
            "baseline (worse: lost; the rest tied). Best epoch: the highest eval accuracy over "
            "the epochs, selected on the same evaluation set (optimistic for every arm alike). "
            "Losses: means over seeds.\n",
            "## Results\n",
            results_table(rows) + "\n",
            "## Eval and training loss, paired with the baseline\n",
            loss_table(rows) + "\n",
            "## DropGrad against a plain smaller learning rate\n",
            "Under AdamW, DropGrad at rate p shrinks the expected step by about sqrt(1 - p) "
            "(docs/analysis.md §1). The control arm trains without DropGrad at "
            f"{LOW_LEARNING_RATE_FACTOR:g} times the learning rate; here each DropGrad arm is "
            "compared with it seed by seed (positive: DropGrad better).\n",
            control_table(rows) + "\n",
            "## The baseline's learning curve (mean over seeds)\n",
            curve_table(rows) + "\n",
        ]
        if rows:
            for path in (plot_metric_vs_rate(rows, out), plot_curves(rows, out)):
                parts.append(f"![{path.stem}]({path.name})\n")
        text = "\n".join(parts)
        harness.atomic_write(out / "summary.md", text)
        return text


STUDY = OverfitStudy()
main = STUDY.main

if __name__ == "__main__":
    main()

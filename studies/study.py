"""Multi-seed study: does DropGrad help low-resource fine-tuning on the flagship task?

Trains the flagship example (bert2bert MiniLM on CMUdict grapheme-to-phoneme, offline) on a
small training subset with and without DropGrad — several rates, encoder-only vs
decoder-only vs both, with and without full update drop — over several seeds, and the
classification example (WordNet definitions → lexicographer class) at two rates. Every run is
the unchanged example script in a subprocess; this study only chooses the flags, then collects
`eval_results.json` and `trainer_state.json`.

Writes into `--out` (default `docs/study`), following the studies' protocol
(`studies/study_harness.py`): `results.json` (one row per run, with its learning curve) and its
flat view `results.csv`, `study_meta.json`, and, recomputed from those alone (`--report`),
`summary.md` (mean ± std per configuration, paired differences to the baseline) and per task
`<task>_metric_vs_rate.png` and `<task>_learning_curves.png`. Finished runs are kept, so an
interrupted study resumes where it stopped.

    python -m studies.study                       # the documented study (~90 min on 2 cores)
    python -m studies.study --report              # summary.md and the plots only
    python -m studies.study --seeds 2 --max_steps 20 --out /tmp/study   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from studies import study_harness as harness
from studies.study_harness import Config, check_rates

ROOT = harness.ROOT

# The examples' own defaults apply DropGrad (the flagship: encoder=0.1,decoder=0.2; the
# classifier: 0.1), so the baselines switch it off explicitly; `check_rates` verifies every run.
SEQ2SEQ_CONFIGS = [
    Config("baseline", ("--dropgrad_rate", "0", "--dropgrad_module_rates", "")),
    Config("both p=0.1", ("--dropgrad_module_rates", "encoder=0.1,decoder=0.1"), 0.1, "both"),
    Config("both p=0.3", ("--dropgrad_module_rates", "encoder=0.3,decoder=0.3"), 0.3, "both"),
    Config("both p=0.5", ("--dropgrad_module_rates", "encoder=0.5,decoder=0.5"), 0.5, "both"),
    Config("encoder p=0.3", ("--dropgrad_module_rates", "encoder=0.3"), 0.3, "encoder"),
    Config("decoder p=0.3", ("--dropgrad_module_rates", "decoder=0.3"), 0.3, "decoder"),
    Config(
        "both p=0.3 full",
        ("--dropgrad_module_rates", "encoder=0.3,decoder=0.3", "--dropgrad_full_update_drop"),
        0.3,
        "both",
        True,
    ),
]
CLASSIFICATION_CONFIGS = [
    Config("baseline", ("--dropgrad_rate", "0")),
    Config("all p=0.1", ("--dropgrad_rate", "0.1"), 0.1, "all"),
    Config("all p=0.3", ("--dropgrad_rate", "0.3"), 0.3, "all"),
]


@dataclass
class Task:
    """One example script the study trains, its configurations and its metrics."""

    name: str
    script: str
    configs: list[Config]
    metrics: tuple[str, ...]  # first one is the headline metric
    lower_is_better: tuple[bool, ...]
    extra: list[str] = field(default_factory=list)


TASKS = {
    "seq2seq": Task(
        "seq2seq", "examples/run_seq2seq.py", SEQ2SEQ_CONFIGS,
        ("eval_token_error_rate", "eval_exact_match", "eval_loss"), (True, False, True),
        ["--eval_before_training", "false", "--per_device_train_batch_size", "16"],
    ),
    "classification": Task(
        "classification", "examples/run_classification.py", CLASSIFICATION_CONFIGS,
        ("eval_accuracy", "eval_loss"), (False, True),
    ),
}


def train_one(task: Task, config: Config, seed: int, args: argparse.Namespace,
              log: IO[str]) -> dict:
    """Train one (task, config, seed) in a subprocess and return its row."""
    run_dir = Path(tempfile.mkdtemp(prefix="study_", dir=args.scratch))
    cmd = [
        sys.executable, str(ROOT / task.script),
        "--output_dir", str(run_dir),
        "--seed", str(seed), "--max_steps", str(args.max_steps),
        "--max_train_samples", str(args.max_train_samples),
        "--max_eval_samples", str(args.max_eval_samples),
        "--logging_steps", str(max(1, args.max_steps // 15)),
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        *task.extra, *config.flags,
    ]
    start = time.time()
    env = dict(os.environ, **harness.OFFLINE_ENV)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            raise RuntimeError(f"run failed: {' '.join(cmd)}\n{tail}")
        metrics = json.loads((run_dir / "eval_results.json").read_text())
        state = json.loads((run_dir / "trainer_state.json").read_text())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # keep the metrics, not 200 MB of weights
    check_rates(config, state["log_history"], run_dir)
    curve = [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]
    return {
        "task": task.name, "config": config.name, "seed": seed, "rate": config.rate,
        "where": config.where, "full_update_drop": config.full_update_drop,
        "seconds": round(time.time() - start, 1), "curve": curve,
        **{m: metrics.get(m) for m in task.metrics},
    }


def summary_table(task: Task, rows: list[dict]) -> str:
    """Markdown: mean ± std per configuration, and the paired difference to the baseline.

    Every configuration runs the same seeds, and a seed fixes the data order, the model's
    dropout and the initialisation in every arm (DropGrad draws its masks from its own
    counter-based stream, not from torch's global generator), so the difference to the
    baseline is taken seed by seed: mean ± standard error of the per-seed differences, and
    in how many seeds the configuration beat the baseline.
    """
    head = task.metrics
    better_low = task.lower_is_better[0]
    lines = [
        "| configuration | runs | " + " | ".join(f"{m} (mean ± std)" for m in head)
        + f" | paired Δ {head[0]} vs baseline (± s.e.) | seeds better than baseline |",
        "| --- | --- | " + " | ".join("---" for _ in head) + " | --- | --- |",
    ]
    base = {r["seed"]: r[head[0]] for r in rows if r["config"] == "baseline"}
    for config in task.configs:
        mine = [r for r in rows if r["config"] == config.name]
        if not mine:
            continue
        cells = []
        for metric in head:
            m, s = harness.mean_sd([r[metric] for r in mine if r[metric] is not None])
            cells.append(f"{harness.fmt(m, 4)} ± {harness.fmt(s, 4)}")
        diff = harness.paired({r["seed"]: r[head[0]] for r in mine}, base, better_low)
        if config.name == "baseline" or not diff.n:
            delta, wins = "—", "—"
        else:
            delta = f"{harness.fmt(diff.mean, 4, sign=True)} (± {harness.fmt(diff.se, 4)})"
            wins = f"{diff.better}/{diff.n}"
        lines.append(f"| {config.name} | {len(mine)} | " + " | ".join(cells)
                     + f" | {delta} | {wins} |")
    return "\n".join(lines)


def plots(task: Task, rows: list[dict], out: Path) -> list[Path]:
    plt = harness.pyplot()

    metric = task.metrics[0]
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple[str, bool], dict[float, list[float]]] = {}
    for r in rows:
        if r[metric] is None:
            continue
        keys = [(r["where"], r["full_update_drop"])]
        if r["config"] == "baseline":  # rate 0 anchors every line
            keys = list({(c.where, c.full_update_drop) for c in task.configs if c.where != "none"})
        for key in keys:
            groups.setdefault(key, {}).setdefault(r["rate"], []).append(r[metric])
    lines = [(key, by_rate) for key, by_rate in sorted(groups.items()) if len(by_rate) > 1]
    for i, ((where, full), by_rate) in enumerate(lines):
        rates = sorted(by_rate)
        means = [statistics.fmean(by_rate[p]) for p in rates]
        stds = [harness.mean_sd(by_rate[p])[1] for p in rates]  # nan: no bar
        label = where + (" + full update drop" if full else "")
        shift = 0.008 * (i - (len(lines) - 1) / 2)  # side by side, so error bars stay readable
        ax.errorbar([r + shift for r in rates], means, yerr=stds, marker="o", capsize=4,
                    label=label)
    ax.set_xlabel("drop rate p (where it applies; points shifted slightly apart)")
    ax.set_ylabel(metric)
    ax.set_title(f"{task.name}: {metric} vs drop rate\n(mean ± std over seeds)", fontsize=10)
    ax.legend()
    written.append(harness.save_figure(fig, out / f"{task.name}_metric_vs_rate.png", dpi=120))

    fig, ax = plt.subplots(figsize=(6, 4))
    for config in task.configs:
        curves = [r["curve"] for r in rows if r["config"] == config.name and r["curve"]]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        ax.plot(steps[:n], mean, label=config.name)
    ax.set_xlabel("optimizer step")
    ax.set_yscale("log")  # the first steps' losses would flatten the differences later on
    ax.set_ylabel("training loss (mean over seeds, log scale)")
    ax.set_title(f"{task.name}: learning curves")
    ax.legend(fontsize=8)
    written.append(harness.save_figure(fig, out / f"{task.name}_learning_curves.png", dpi=120))
    return written


# ---------------------------------------------------------------- the study

#: The documented study's settings (the command line's defaults).
DEFAULTS: dict[str, Any] = {
    "seeds": 5,
    "max_steps": 100,
    "max_train_samples": 1000,
    "max_eval_samples": 150,
}
CSV_FIELDS = [
    "task", "config", "seed", "rate", "where", "full_update_drop", "seconds",
    "eval_token_error_rate", "eval_exact_match", "eval_loss", "eval_accuracy",
]
TASK_ORDER = {name: i for i, name in enumerate(TASKS)}
CONFIG_ORDER = {(task.name, config.name): i for task in TASKS.values()
                for i, config in enumerate(task.configs)}


class MultiSeedStudy(harness.Study):
    """Both examples, every configuration of each, every seed; short runs (`--max_steps`)."""

    module = "studies.study"
    out = "docs/study"
    defaults = DEFAULTS
    arms = (*SEQ2SEQ_CONFIGS, *CLASSIFICATION_CONFIGS)
    budget_minutes = 85.0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))

    def grown(self, args: argparse.Namespace, old: Mapping[str, Any]) -> dict[str, Any]:
        tasks = [name for name in TASKS if name in args.tasks or name in old.get("tasks", ())]
        return {**super().grown(args, old), "tasks": tasks}

    def store(self, out: Path) -> harness.ResultStore:
        """`results.json` (with the learning curves) and its flat view `results.csv`, one row
        per (task, configuration, seed), task by task, seed-major."""
        return harness.ResultStore(
            out, ("task", "config", "seed"), CSV_FIELDS,
            sort_key=lambda r: (TASK_ORDER.get(r["task"], 99), r["seed"],
                                CONFIG_ORDER.get((r["task"], r["config"]), 99)),
        )

    def jobs(self, args: argparse.Namespace) -> Iterator[harness.Job]:
        """Task by task, seed-major: a cut-short study stays balanced."""
        chosen = {arm.name for arm in self.selected_arms(args)}
        for task_name in args.tasks:
            task = TASKS[task_name]
            for seed in range(args.seeds):
                for config in task.configs:
                    if config.name in chosen:
                        yield harness.Job(
                            (task.name, config.name, seed),
                            f"{task.name} {config.name:>18} seed {seed}",
                            lambda log, t=task, c=config, s=seed: train_one(t, c, s, args, log),
                        )

    def describe(self, row: dict) -> str:
        head = TASKS[row["task"]].metrics[0]
        return f"{head} = {row[head]:.4f} ({row['seconds']:.0f} s)"

    def report(self, out: Path, meta: Mapping[str, Any]) -> str:
        """summary.md and the plots, from `results.json` and `meta` alone."""
        rows = self.store(out).load()
        settings = meta.get("settings", {key: DEFAULTS[key] for key in DEFAULTS
                                         if key != "seeds"})
        seeds = meta.get("seeds", DEFAULTS["seeds"])
        tasks = meta.get("tasks", list(TASKS))
        machine = meta.get("machine", {})
        missing = seeds * sum(len(TASKS[name].configs) for name in tasks) - len(rows)
        parts = [
            "# Study results (generated by studies/study.py)\n",
            f"Command: `{meta.get('command', 'python -m studies.study')}`\n",
            f"Settings: {seeds} seeds, {settings['max_steps']} optimizer steps, "
            f"{settings['max_train_samples']} training examples, "
            f"{settings['max_eval_samples']} evaluation examples; {len(rows)} runs, "
            f"{sum(r['seconds'] for r in rows) / 60:.1f} min of training and evaluation in all "
            f"(torch {machine.get('torch', '?')}, {machine.get('cpu_count', '?')} CPU cores)"
            + (f" ({missing} runs missing: rerun the command to resume)" if missing > 0 else "")
            + ".\n",
        ]
        for task_name in tasks:
            task = TASKS[task_name]
            mine = [r for r in rows if r["task"] == task_name]
            if not mine:
                continue
            parts.append(f"## {task_name}\n\n{summary_table(task, mine)}\n")
            for path in plots(task, mine, out):
                parts.append(f"![{path.stem}]({path.name})\n")
        text = "\n".join(parts)
        harness.atomic_write(out / "summary.md", text)
        return text


STUDY = MultiSeedStudy()
main = STUDY.main


if __name__ == "__main__":
    main()

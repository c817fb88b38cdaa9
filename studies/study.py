"""Multi-seed study: does DropGrad help low-resource fine-tuning on the flagship task?

Trains the flagship example (bert2bert MiniLM on CMUdict grapheme-to-phoneme, offline) on a
small training subset with and without DropGrad — several rates, encoder-only vs
decoder-only vs both, with and without full update drop — over several seeds, and the
classification example (WordNet definitions → lexicographer class) at two rates. Every run is
the unchanged example script in a subprocess; this script only chooses the flags, then collects
`eval_results.json` and `trainer_state.json`.

Writes into `--out` (default `docs/study`): `results.csv` / `results.json` (one row per run),
`summary.md` (mean ± std per configuration, paired differences to the baseline), and per task
`<task>_metric_vs_rate.png` and `<task>_learning_curves.png`.
Finished runs are reused, so an interrupted study resumes where it stopped.

    python scripts/study.py                       # the documented study (~90 min on 2 cores)
    python scripts/study.py --seeds 2 --max_steps 20 --out /tmp/study   # a quick smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import study_harness as harness
from study_harness import Config, check_rates, expected_rate_logs, slug  # noqa: F401

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


def run_one(task: Task, config: Config, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """Train one (task, config, seed) in a subprocess, or reuse its finished results."""
    run_dir = out / "runs" / task.name / slug(config.name) / f"seed{seed}"
    done = run_dir / "study_row.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
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
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise RuntimeError(f"run failed: {' '.join(cmd)}\n{tail}")
    metrics = json.loads((run_dir / "eval_results.json").read_text())
    state = json.loads((run_dir / "trainer_state.json").read_text())
    check_rates(config, state["log_history"], run_dir)
    curve = [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]
    row = {
        "task": task.name, "config": config.name, "seed": seed, "rate": config.rate,
        "where": config.where, "full_update_drop": config.full_update_drop,
        "seconds": round(time.time() - start, 1), "curve": curve,
        **{m: metrics.get(m) for m in task.metrics},
    }
    done.write_text(json.dumps(row))
    for weights in run_dir.glob("*.safetensors"):  # keep the metrics, not 200 MB of weights
        weights.unlink()
    return row


def torch_version() -> str:
    import torch

    return torch.__version__


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = out / f"{task.name}_metric_vs_rate.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

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
    fig.tight_layout()
    path = out / f"{task.name}_learning_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--tasks", nargs="+", default=["seq2seq", "classification"], choices=sorted(TASKS)
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--max_train_samples", type=int, default=1000)
    parser.add_argument("--max_eval_samples", type=int, default=150)
    parser.add_argument("--budget_minutes", type=float, default=85.0,
                        help="launch no new run after this; finished runs are kept")
    parser.add_argument("--configs", nargs="+", default=None,
                        help="only these configurations (names as in the tables)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "study")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows: list[dict] = []
    stopped = False
    for task_name in args.tasks:
        task = TASKS[task_name]
        if args.configs:
            task.configs = [c for c in task.configs if c.name in args.configs]
        for seed in range(args.seeds):  # seed-major: a cut-short study stays balanced
            for config in task.configs:
                if (time.time() - start) / 60 > args.budget_minutes:
                    stopped = True
                    break
                row = run_one(task, config, seed, args, args.out)
                rows.append(row)
                head = task.metrics[0]
                print(f"[{(time.time() - start) / 60:5.1f} min] {task.name} {config.name:>18} "
                      f"seed {seed}: {head} = {row[head]:.4f} ({row['seconds']:.0f} s)", flush=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        keys = [k for k in rows[0] if k != "curve"] if rows else []
        all_keys = sorted({k for r in rows for k in r if k != "curve"}, key=lambda k: (
            keys.index(k) if k in keys else len(keys), k))
        writer = csv.DictWriter(f, fieldnames=all_keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    parts = [
        "# Study results (generated by scripts/study.py)\n",
        f"Command: `{' '.join(['python', 'scripts/study.py', *sys.argv[1:]])}`\n",
        f"Settings: {args.seeds} seeds, {args.max_steps} optimizer steps, "
        f"{args.max_train_samples} training examples, {args.max_eval_samples} evaluation "
        f"examples; {len(rows)} runs, {sum(r['seconds'] for r in rows) / 60:.1f} min of "
        f"training and evaluation in all (torch {torch_version()}, "
        f"{os.cpu_count()} CPU cores)"
        + (" (stopped at the time budget)" if stopped else "") + ".\n",
    ]
    for task_name in args.tasks:
        task = TASKS[task_name]
        mine = [r for r in rows if r["task"] == task_name]
        if not mine:
            continue
        parts.append(f"## {task_name}\n\n{summary_table(task, mine)}\n")
        for path in plots(task, mine, args.out):
            parts.append(f"![{path.stem}]({path.name})\n")
    (args.out / "summary.md").write_text("\n".join(parts))
    print("\n".join(parts))


if __name__ == "__main__":
    main()

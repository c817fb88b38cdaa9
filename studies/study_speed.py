"""Does DropGrad accelerate optimization? Steps to a dev target, and the stable learning rates.

DropGrad's title promises "regularization and accelerated optimization"; docs/analysis.md §5-§8
measure the first. This study measures the second, on two task families, with the protocol of
the tuned-against-tuned study (`studies/study_tuned.py`, analysis §8): a dev split makes every
choice, a test split only reports, seeds are paired across arms.

- **classification**: §8's task and settings (pretrained MiniLM-L6, the first 64 WordNet
  definitions → 41 lexicographer classes, 12 epochs at batch 8 = 96 AdamW steps, 10 % warm-up,
  linear decay; dev = the first 300 definitions of the validation split, test = the next 1000).
  Metric: accuracy, in percent.
- **seq2seq**: the flagship bert2bert grapheme-to-phoneme task of `examples/run_seq2seq.py`
  (two MiniLM-L6 copies, CMUdict), shortened to what the budget allows: `--s2s_max_steps` AdamW
  steps at batch `--s2s_batch_size` on the whole training split (each word seen at most once),
  10 % warm-up, linear decay; dev = the first `--s2s_dev_samples` words of the validation split,
  test = the next `--s2s_test_samples`. Metric: teacher-forced next-phoneme accuracy, in
  percent (the example's `eval_token_accuracy` with `--predict_with_generate false`): a run this
  short is still on the plateau before generated words come out right (phoneme error rate ≈
  85-95 %, word accuracy 0, docs/analysis.md §5), where the generation metrics measure nothing.

Arms (both tasks): the baseline (p = 0), DropGrad on every parameter at p = 0.3 and p = 0.6 (the
"DropGrad" arm is whichever (p, learning rate) has the best mean dev metric), and full update
drop at p = 0.5. Every arm runs at every learning rate of `--learning_rates` (at least 32x from
lowest to highest) and the first `--grid_seeds_<task>` seeds, scored once at the end on dev and
test. Each arm's learning rate is the one with the best mean dev metric over the seeds that ran
the whole grid. Then every arm runs `--seeds` seeds at its chosen rate with the dev metric
logged every `--eval_steps` (`--s2s_eval_steps`) steps (the examples' `--eval_strategy steps
--eval_steps N`): its learning curve. The target is `--target_fraction` of the tuned baseline's
mean final dev metric; a run's steps to target is the first logged step whose dev metric reaches
it (empty when it never does).

Classification's grid runs without curves are §8's protocol exactly, so the rows of
`docs/study/tuned/results.csv` (baseline, p = 0.6 and full update drop at 2e-3 ... 2.5e-4,
seeds 0-7) are reused, marked `source = study_tuned`; the curve runs are new: evaluating during
training draws from torch's random stream (each evaluation's data loader takes a seed from it),
so a run with a curve is a different draw of the same protocol, not the same run. For seq2seq
every run logs its curve, and the chosen rate's grid runs are its first seeds.

Each finished run is one row of `results.json` (with its curve) and of its flat view
`results.csv`, in `--out` (default `docs/study/speed`); the target and every run's steps (and
seconds) to target are recomputed from all rows whenever a row is added. A rerun of the same
command trains only the missing runs; `--report` rebuilds `summary.md` and the plots from the
results alone.

    nice -n 19 python -m studies.study_speed --workers 1 --threads 1   # the study (§9)
    python -m studies.study_speed --report                   # summary.md and the plots
    python -m studies.study_speed --seeds 2 --grid_seeds_classification 1 \\
        --grid_seeds_seq2seq 1 --learning_rates 1e-3 1e-4 --epochs 1 --max_train_samples 8 \\
        --dev_samples 8 --test_samples 8 --eval_steps 1 --s2s_max_steps 2 --s2s_batch_size 2 \\
        --s2s_dev_samples 8 --s2s_test_samples 8 --s2s_eval_steps 1 --out /tmp/speed  # smoke
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
from studies import study_tuned as tuned
from studies.study_harness import Config

TASKS = ("classification", "seq2seq")
TASK_ORDER = {task: i for i, task in enumerate(TASKS)}

#: The metric of each task (higher is better in both), as the tables name it.
METRIC = {"classification": "accuracy %", "seq2seq": "next-phoneme accuracy %"}

BASELINE = "baseline"
FULL = "p=0.5 full update drop"
#: The DropGrad arms; the study's "DropGrad" is the one of them with the best mean dev metric.
DROPGRAD = ("p=0.3", "p=0.6")

# Classification's arms are §8's (the same flags, so its runs are reusable), plus p = 0.3.
ARMS = [
    tuned.ARMS_BY_NAME[BASELINE],
    Config("p=0.3", ("--dropgrad_rate", "0.3"), 0.3, "all"),
    tuned.ARMS_BY_NAME["p=0.6"],
    tuned.ARMS_BY_NAME[FULL],
]
ARMS_BY_NAME = {arm.name: arm for arm in ARMS}
ARM_ORDER = {arm.name: i for i, arm in enumerate(ARMS)}


def task_arm(name: str, task: str) -> Config:
    """An arm's configuration for a task: the seq2seq example applies its own per-module rates
    (encoder 0.1, decoder 0.2) unless `--dropgrad_module_rates` is emptied, so every seq2seq arm
    empties it and sets one rate for every parameter."""
    arm = ARMS_BY_NAME[name]
    if task == "seq2seq":
        return Config(arm.name, (*arm.flags, "--dropgrad_module_rates", ""), arm.rate, arm.where,
                      arm.full_update_drop)
    return arm


#: The documented study (the command line's defaults).
DEFAULTS: dict[str, Any] = {
    "seeds": 8,  # seeds at each arm's chosen learning rate, with learning curves
    "grid_seeds_classification": 8,
    "grid_seeds_seq2seq": 2,
    "learning_rates": [4e-3, 2e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4],  # 32x, both tasks
    "target_fraction": 0.95,
    # classification: analysis §8's settings (study_tuned's flags, same names)
    "epochs": 12,
    "max_train_samples": 64,
    "dev_samples": 300,
    "test_samples": 1000,
    "batch_size": 8,
    "max_seq_length": 24,
    "eval_steps": 8,  # once per epoch
    # seq2seq: the flagship, shortened
    "s2s_max_steps": 100,
    "s2s_batch_size": 16,
    "s2s_dev_samples": 300,
    "s2s_test_samples": 1000,
    "s2s_eval_steps": 10,
}
GROWABLE = ("seeds", "grid_seeds_classification", "grid_seeds_seq2seq", "learning_rates")
#: The settings §8's runs were made with: its rows are reused when these are equal.
TUNED_SETTINGS = ("epochs", "max_train_samples", "dev_samples", "test_samples", "batch_size",
                  "max_seq_length")

KEY_FIELDS = ("task", "arm", "learning_rate", "seed", "with_curve")
CSV_FIELDS = [
    "task", "arm", "learning_rate", "seed", "drop_rate", "full_update_drop", "with_curve",
    "dev_metric", "test_metric", "target", "steps_to_target", "seconds_to_target",
    "dev_loss", "test_loss", "final_train_loss", "steps", "train_seconds_per_step", "seconds",
    "cpu_seconds", "source",
]


def grid_seeds(settings: Mapping[str, Any], task: str) -> int:
    return settings[f"grid_seeds_{task}"]


def grid_with_curve(task: str) -> bool:
    """Whether a task's grid runs log learning curves (seq2seq) or are scored only at the end
    (classification: §8's protocol, whose runs are reused)."""
    return task == "seq2seq"


# ---------------------------------------------------------------- one run


def curve_of(history: Sequence[Mapping[str, Any]], key: str) -> list[list[float]]:
    """The learning curve a run logged: ``[step, dev metric in percent, dev loss]`` per
    evaluation, in order of steps; the evaluation after training repeats the last step and is
    left out."""
    points: dict[int, list[float]] = {}
    for entry in history:
        if key in entry and entry["step"] not in points:
            points[entry["step"]] = [entry["step"], round(100 * entry[key], 4),
                                     round(entry["eval_loss"], 4)]
    return [points[step] for step in sorted(points)]


def train_seconds_per_step(history: Sequence[Mapping[str, Any]]) -> float | None:
    """Training time per optimizer step: the train loop's wall time less the evaluations it
    ran, over its steps."""
    end = next((i for i, e in enumerate(history) if "train_runtime" in e), None)
    if end is None or not history[end].get("step"):
        return None
    evals = sum(e.get("eval_runtime", 0.0) for e in history[:end])
    return round((history[end]["train_runtime"] - evals) / history[end]["step"], 4)


def _row(task: str, arm: Config, learning_rate: float, seed: int, with_curve: bool,
         history: Sequence[Mapping[str, Any]], scores: Mapping[str, float], curve: list,
         seconds: float, cpu_seconds: float | None, source: str = "this study") -> dict:
    losses = [e["loss"] for e in history if "loss" in e]
    return {
        "task": task, "arm": arm.name, "learning_rate": learning_rate, "seed": seed,
        "drop_rate": arm.rate, "full_update_drop": arm.full_update_drop,
        "with_curve": with_curve,
        "dev_metric": round(scores["dev_metric"], 4),
        "test_metric": round(scores["test_metric"], 4),
        "target": None, "steps_to_target": None, "seconds_to_target": None,
        "dev_loss": round(scores["dev_loss"], 4), "test_loss": round(scores["test_loss"], 4),
        "final_train_loss": round(losses[-1], 4) if losses else None,
        "steps": max((e.get("step", 0) for e in history), default=0),
        "train_seconds_per_step": train_seconds_per_step(history),
        "seconds": round(seconds, 1),
        "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 1),
        "source": source, "curve": curve,
    }


def reused_row(row: Mapping[str, Any]) -> dict:
    """A row of §8's results (`docs/study/tuned/results.csv`) as a row of this study."""
    return {
        "task": "classification", "arm": row["arm"], "learning_rate": row["learning_rate"],
        "seed": row["seed"], "drop_rate": row["drop_rate"],
        "full_update_drop": row["full_update_drop"], "with_curve": False,
        "dev_metric": row["dev_accuracy"], "test_metric": row["test_accuracy"],
        "target": None, "steps_to_target": None, "seconds_to_target": None,
        "dev_loss": row["dev_loss"], "test_loss": row["test_loss"],
        "final_train_loss": row["final_train_loss"], "steps": row["steps"],
        "train_seconds_per_step": None, "seconds": row["seconds"], "cpu_seconds": None,
        "source": "study_tuned", "curve": [],
    }


def tuned_rows(args: argparse.Namespace) -> dict[tuple, dict]:
    """§8's finished runs by (arm, learning rate, seed), when its settings are this study's
    classification settings (none otherwise)."""
    folder = harness.ROOT / tuned.STUDY.out
    meta = harness.read_meta(folder)
    if meta.get("settings") != {key: getattr(args, key) for key in TUNED_SETTINGS}:
        return {}
    return {(r["arm"], r["learning_rate"], r["seed"]): r
            for r in tuned.STUDY.store(folder).load()}


def classification_argv(arm: Config, learning_rate: float, seed: int,
                        args: argparse.Namespace, output_dir: Path, with_curve: bool) -> list[str]:
    """§8's command line of the classification example; with a curve, the dev split is also
    evaluated every `--eval_steps` steps during training."""
    argv = tuned.run_argv(arm, learning_rate, seed, args, output_dir)
    if with_curve:
        argv += ["--do_eval", "true", "--eval_strategy", "steps",
                 "--eval_steps", str(args.eval_steps), "--max_eval_samples", str(args.dev_samples)]
    return argv


def train_classification(arm: Config, learning_rate: float, seed: int, with_curve: bool,
                         args: argparse.Namespace, log: IO[str]) -> dict:
    """Train one classification run in this process (§8's way), score it on dev and test."""
    if not with_curve:
        reused = tuned_rows(args).get((arm.name, learning_rate, seed))
        if reused is not None:
            return reused_row(reused)

    def read(output_dir: Path, history: list[dict]) -> dict[str, float]:
        tuned.verify_run(arm, learning_rate, output_dir, history)
        return tuned.score(output_dir, args)

    run = harness.run_example(
        "run_classification",
        lambda output_dir: classification_argv(arm, learning_rate, seed, args, output_dir,
                                               with_curve),
        read, log, args.scratch, prefix="speed_")
    scores = {"dev_metric": run.result["dev_accuracy"], "test_metric": run.result["test_accuracy"],
              "dev_loss": run.result["dev_loss"], "test_loss": run.result["test_loss"]}
    return _row("classification", arm, learning_rate, seed, with_curve, run.history, scores,
                curve_of(run.history, "eval_accuracy"), run.seconds, run.cpu_seconds)


def seq2seq_argv(arm: Config, learning_rate: float, seed: int, args: argparse.Namespace,
                 output_dir: Path) -> list[str]:
    """The flagship example's command line for one run: the dev split evaluated every
    `--s2s_eval_steps` steps, teacher-forced (no generation)."""
    return [
        "--output_dir", str(output_dir), "--seed", str(seed),
        "--max_steps", str(args.s2s_max_steps),
        "--per_device_train_batch_size", str(args.s2s_batch_size),
        "--per_device_eval_batch_size", "128",
        "--learning_rate", repr(learning_rate), "--warmup_steps", "0.1",
        "--predict_with_generate", "false",
        "--do_eval", "true", "--eval_strategy", "steps",
        "--eval_steps", str(args.s2s_eval_steps), "--max_eval_samples", str(args.s2s_dev_samples),
        "--logging_steps", str(args.s2s_eval_steps), "--save_strategy", "no",
        "--eval_before_training", "false", "--num_example_predictions", "0",
        "--report_to", "none", "--disable_tqdm", "true", "--log_level", "warning",
        *arm.flags,
    ]


_S2S_ENCODED: dict[tuple, dict[str, list]] = {}


def seq2seq_splits(dev_samples: int, test_samples: int) -> dict[str, list[dict]]:
    """Dev and test words: consecutive, disjoint slices of the example's validation split."""
    offline_data = harness.load_example("offline_data")
    files = offline_data.extract_cmudict(root=offline_data.cache_dir() / "data")
    with open(files["validation"], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    if dev_samples + test_samples > len(rows):
        raise ValueError(f"--s2s_dev_samples + --s2s_test_samples must be at most {len(rows)} "
                         f"(the validation split), got {dev_samples} + {test_samples}")
    return {"dev": rows[:dev_samples], "test": rows[dev_samples:dev_samples + test_samples]}


def _seq2seq_batches(model_dir: Path, model: Any, args: argparse.Namespace) -> dict[str, list]:
    """Dev and test tokenized as the example does (its own `preprocess`), in collated batches;
    once per process."""
    key = (args.s2s_dev_samples, args.s2s_test_samples)
    if key not in _S2S_ENCODED:
        from datasets import Dataset, DatasetDict
        from transformers import AutoTokenizer, DataCollatorForSeq2Seq

        run_seq2seq = harness.load_example("run_seq2seq")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        _, data_args, training_args = run_seq2seq.parse_arguments(
            ["--output_dir", str(model_dir), "--do_train", "false", "--max_eval_samples", "-1"])
        collate = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
        encoded = {}
        for split, rows in seq2seq_splits(*key).items():
            raw = DatasetDict({"validation": Dataset.from_list(rows)})
            _, dataset, _ = run_seq2seq.preprocess(raw, tokenizer, model, data_args,
                                                   training_args)
            features = list(dataset)
            encoded[split] = [collate(features[i:i + 128]) for i in range(0, len(features), 128)]
        _S2S_ENCODED[key] = encoded
    return _S2S_ENCODED[key]


def score_seq2seq(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Teacher-forced next-phoneme accuracy (percent) and mean cross-entropy per target token
    of the saved model, on dev and on test."""
    import torch
    from transformers import AutoConfig, EncoderDecoderModel

    if AutoConfig.from_pretrained(model_dir).model_type != "encoder-decoder":
        raise ValueError(f"{model_dir} does not hold the example's bert2bert model")
    model = EncoderDecoderModel.from_pretrained(model_dir).eval()
    out = {}
    with torch.inference_mode():
        for split, batches in _seq2seq_batches(model_dir, model, args).items():
            correct = count = 0
            loss = 0.0
            for batch in batches:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                labels = batch["labels"]
                mask = labels != -100
                correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
                loss += float(torch.nn.functional.cross_entropy(
                    logits[mask], labels[mask], reduction="sum"))
                count += int(mask.sum())
            out[f"{split}_metric"] = 100 * correct / count
            out[f"{split}_loss"] = loss / count
    return out


def train_seq2seq(arm: Config, learning_rate: float, seed: int, args: argparse.Namespace,
                  log: IO[str]) -> dict:
    """Train one seq2seq run in this process, its dev curve logged; score it on dev and test."""

    def read(output_dir: Path, history: list[dict]) -> dict[str, float]:
        tuned.verify_run(arm, learning_rate, output_dir, history)
        return score_seq2seq(output_dir, args)

    run = harness.run_example(
        "run_seq2seq", lambda output_dir: seq2seq_argv(arm, learning_rate, seed, args, output_dir),
        read, log, args.scratch, prefix="speed_")
    return _row("seq2seq", arm, learning_rate, seed, True, run.history, run.result,
                curve_of(run.history, "eval_token_accuracy"), run.seconds, run.cpu_seconds)


def train_one(task: str, arm_name: str, learning_rate: float, seed: int, with_curve: bool,
              args: argparse.Namespace, log: IO[str]) -> dict:
    arm = task_arm(arm_name, task)
    if task == "classification":
        return train_classification(arm, learning_rate, seed, with_curve, args, log)
    return train_seq2seq(arm, learning_rate, seed, args, log)


# ---------------------------------------------------------------- choices (dev only)


def grid_rows(rows: Sequence[Mapping[str, Any]], task: str, learning_rates: Sequence[float],
              seeds: int) -> list[Mapping[str, Any]]:
    """The rows that make a task's choices: its grid runs (of the grid's kind) at the grid's
    learning rates, of the first `seeds` seeds that have every arm at every rate."""
    mine = [r for r in rows if r["task"] == task and r["with_curve"] == grid_with_curve(task)
            and r["learning_rate"] in learning_rates and r["seed"] < seeds]
    have = {(r["arm"], r["learning_rate"], r["seed"]) for r in mine}
    complete = {seed for seed in range(seeds)
                if all((arm.name, rate, seed) in have for arm in ARMS for rate in learning_rates)}
    return [r for r in mine if r["seed"] in complete]


def dev_curve(rows: Sequence[Mapping[str, Any]], arm: str) -> dict[float, float]:
    """Mean final dev metric per learning rate of one arm (reads `arm`, `learning_rate` and
    `dev_metric` only)."""
    by_rate: dict[float, list[float]] = {}
    for row in rows:
        if row["arm"] == arm:
            by_rate.setdefault(row["learning_rate"], []).append(row["dev_metric"])
    return {rate: statistics.fmean(values) for rate, values in by_rate.items()}


def choose(grid: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, float]]:
    """Each reported arm's configuration and learning rate, by the best mean dev metric (a tie
    goes to the larger rate): ``{"baseline": (arm, rate), "DropGrad": (the better of the
    DropGrad arms, its rate), "full update drop": (arm, rate)}``. Empty without grid rows."""
    best = {}
    for arm in dict.fromkeys(r["arm"] for r in grid):
        curve = dev_curve(grid, arm)
        rate = max(curve, key=lambda lr: (curve[lr], lr))
        best[arm] = (curve[rate], rate)
    if not best:
        return {}
    dropgrad = max((arm for arm in DROPGRAD if arm in best), key=lambda arm: best[arm])
    return {"baseline": (BASELINE, best[BASELINE][1]),
            "DropGrad": (dropgrad, best[dropgrad][1]),
            "full update drop": (FULL, best[FULL][1])}


def stable_range(grid: Sequence[Mapping[str, Any]], arm: str, points: float = 1.0) -> list[float]:
    """The learning rates whose mean dev metric is within `points` of the arm's best."""
    curve = dev_curve(grid, arm)
    best = max(curve.values())
    return sorted(rate for rate, value in curve.items() if value >= best - points)


def steps_to_target(curve: Sequence[Sequence[float]], target: float) -> int | None:
    """The first logged step whose dev metric reaches `target` (None: never)."""
    return next((int(step) for step, metric, *_ in curve if metric >= target), None)


def derive(rows: list[dict], settings: Mapping[str, Any], learning_rates: Sequence[float],
           seeds: Mapping[str, int]) -> list[dict]:
    """Fill in every run's target and steps (and seconds) to it: the target of a task is
    `target_fraction` of the tuned baseline's mean final dev metric (unknown, and the fields
    empty, until some seed has run the task's whole grid)."""
    for task in TASKS:
        grid = grid_rows(rows, task, learning_rates, seeds[task])
        chosen = choose(grid)
        target = None
        if chosen:
            base = dev_curve(grid, BASELINE)[chosen["baseline"][1]]
            target = round(settings["target_fraction"] * base, 4)
        for row in rows:
            if row["task"] != task:
                continue
            row["target"] = target
            steps = None
            if target is not None and row["with_curve"]:
                steps = steps_to_target(row["curve"], target)
            row["steps_to_target"] = steps
            per_step = row.get("train_seconds_per_step")
            row["seconds_to_target"] = (round(steps * per_step, 1)
                                        if steps is not None and per_step else None)
    return rows


def resolved(meta: Mapping[str, Any]) -> tuple[dict, list[float], dict[str, int]]:
    """A study folder's settings, learning-rate grid and grid seeds per task, from its
    `study_meta.json` (the defaults before the first launch)."""
    settings = meta.get("settings", {k: v for k, v in DEFAULTS.items() if k not in GROWABLE})
    rates = list(meta.get("learning_rates", DEFAULTS["learning_rates"]))
    seeds = {task: meta.get(f"grid_seeds_{task}", DEFAULTS[f"grid_seeds_{task}"])
             for task in TASKS}
    return settings, rates, seeds


class SpeedStore(harness.ResultStore):
    """The study's rows (`results.json`, its flat view `results.csv`), with every run's target
    and steps to target recomputed from all rows on each save, under the settings of the
    folder's `study_meta.json` as it is then."""

    def __init__(self, out: Path) -> None:
        super().__init__(out, KEY_FIELDS, CSV_FIELDS, sort_key=sort_key, keep_json=True)

    def save(self, rows: list[dict]) -> None:
        super().save(derive(rows, *resolved(harness.read_meta(self.out))))


def sort_key(row: Mapping[str, Any]) -> tuple:
    return (TASK_ORDER[row["task"]], row["with_curve"], row["seed"], -row["learning_rate"],
            ARM_ORDER[row["arm"]])


# ---------------------------------------------------------------- the report


def by_seed(rows: Sequence[Mapping[str, Any]], arm: str, rate: float, key: str) -> dict:
    return {r["seed"]: r[key] for r in rows if r["arm"] == arm and r["learning_rate"] == rate}


def report_rows(rows: Sequence[Mapping[str, Any]], task: str) -> list[Mapping[str, Any]]:
    """A task's runs of the grid's kind (the final metrics at the chosen rates come from
    these: for seq2seq they include the chosen rates' extra seeds)."""
    return [r for r in rows if r["task"] == task and r["with_curve"] == grid_with_curve(task)]


def curve_rows(rows: Sequence[Mapping[str, Any]], task: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["task"] == task and r["with_curve"]]


def area(curve: Sequence[Sequence[float]]) -> float:
    """Mean dev metric over a run's logged curve: how fast it learned, never censored."""
    return statistics.fmean(point[1] for point in curve) if curve else math.nan


def display(label: str, arm: str) -> str:
    """How the tables name a reported arm: "DropGrad (p=0.6)", "full update drop (p=0.5)"."""
    return label if label == arm else f"{label} ({arm.split()[0]})"


def _pm(pair: tuple[float, float], digits: int = 1) -> str:
    return f"{harness.fmt(pair[0], digits)} ± {harness.fmt(pair[1], digits)}"


def _delta(p: harness.Paired, digits: int = 1) -> str:
    return f"{harness.fmt(p.mean, digits, sign=True)} ± {harness.fmt(p.se, digits)}"


def _rates(rates: Sequence[float]) -> str:
    if not rates:
        return "—"
    low, high = min(rates), max(rates)
    return f"{low:g}" if low == high else f"{low:g} to {high:g} ({high / low:g}x)"


def task_summary(rows: Sequence[Mapping[str, Any]], task: str, learning_rates: Sequence[float],
                 seeds: int, grid_seed_count: int) -> dict[str, Any]:
    """Every figure the summary shows for one task, computed from the rows (the test reads
    them back from results.csv)."""
    grid = grid_rows(rows, task, learning_rates, grid_seed_count)
    chosen = choose(grid)
    if not chosen:
        return {}
    final = report_rows(rows, task)
    curves = curve_rows(rows, task)
    base_arm, base_rate = chosen["baseline"]
    top = max(learning_rates)
    out: dict[str, Any] = {"grid_seeds": sorted({r["seed"] for r in grid}), "arms": {}}
    out["target"] = next(r["target"] for r in rows if r["task"] == task)
    base_test = by_seed(final, base_arm, base_rate, "test_metric")
    base_dev = by_seed(final, base_arm, base_rate, "dev_metric")
    base_steps = by_seed(curves, base_arm, base_rate, "steps_to_target")
    base_area = {seed: area(c) for seed, c in by_seed(curves, base_arm, base_rate,
                                                        "curve").items()}
    base_top = by_seed(final, BASELINE, top, "test_metric")
    for label, (arm, rate) in chosen.items():
        dev = by_seed(final, arm, rate, "dev_metric")
        test = by_seed(final, arm, rate, "test_metric")
        steps = by_seed(curves, arm, rate, "steps_to_target")
        seconds = by_seed(curves, arm, rate, "seconds_to_target")
        areas = {seed: area(c) for seed, c in by_seed(curves, arm, rate, "curve").items()}
        reached = [s for s in steps.values() if s is not None]
        both = {seed: s for seed, s in steps.items()
                if s is not None and base_steps.get(seed) is not None}
        stable = stable_range(grid, arm)
        top_dev = by_seed(grid, arm, top, "dev_metric")
        top_test = by_seed(final, arm, top, "test_metric")
        out["arms"][label] = {
            "arm": arm, "learning_rate": rate, "runs": len(test),
            "dev": harness.mean_sd(list(dev.values())),
            "test": harness.mean_sd(list(test.values())),
            "paired_test": harness.paired(test, base_test),
            "paired_dev": harness.paired(dev, base_dev),
            "stable": stable,
            "top_dev": harness.mean_sd(list(top_dev.values())),
            "top_test": harness.mean_sd(list(top_test.values())),
            "paired_top_test": harness.paired(top_test, base_top),
            "curves": len(steps), "reached": len(reached),
            "steps": harness.mean_sd(reached),
            "seconds": harness.mean_sd([s for s in seconds.values() if s is not None]),
            "paired_steps": harness.paired(both, base_steps, lower_is_better=True),
            "paired_seconds": harness.paired(
                {s: v for s, v in seconds.items() if v is not None},
                {s: v for s, v in by_seed(curves, base_arm, base_rate,
                                          "seconds_to_target").items() if v is not None},
                lower_is_better=True),
            "area": harness.mean_sd([a for a in areas.values() if not math.isnan(a)]),
            "paired_area": harness.paired(areas, base_area),
        }
    out["dropgrad_choice"] = {arm: max(dev_curve(grid, arm).items(), key=lambda kv: (kv[1], kv[0]))
                              for arm in DROPGRAD}
    return out


def chosen_table(summary: Mapping[str, Any], task: str) -> str:
    lines = [
        f"| arm | learning rate (best mean dev) | runs | dev {METRIC[task]} | test "
        f"{METRIC[task]} | paired Δ test vs tuned baseline (± s.e.) | seeds better / worse | "
        "stable range (dev within 1 point of the arm's best) | dev / test at the highest rate "
        "| paired Δ test at the highest rate vs baseline there |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, s in summary["arms"].items():
        name = display(label, s["arm"])
        if label == "baseline":
            delta = better = top_delta = "—"
        else:
            delta = _delta(s["paired_test"])
            better = f"{s['paired_test'].better} / {s['paired_test'].worse} of {s['paired_test'].n}"
            top_delta = _delta(s["paired_top_test"])
        lines.append(
            f"| {name} | {s['learning_rate']:g} | {s['runs']} | {_pm(s['dev'])} | "
            f"{_pm(s['test'])} | {delta} | {better} | {_rates(s['stable'])} | "
            f"{harness.fmt(s['top_dev'][0])} / {harness.fmt(s['top_test'][0])} | {top_delta} |")
    return "\n".join(lines)


def speed_table(summary: Mapping[str, Any], task: str) -> str:
    lines = [
        "| arm | learning rate | runs with curves | reached the target | steps to target "
        "(mean ± sd, runs that reached it) | paired Δ steps vs tuned baseline (± s.e.; seeds "
        "where both reached) | faster / slower | paired Δ training seconds to target (± s.e.) "
        f"| mean dev {METRIC[task]} over the curve | paired Δ (± s.e.) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, s in summary["arms"].items():
        name = display(label, s["arm"])
        if label == "baseline":
            delta = faster = seconds = area_delta = "—"
        else:
            p = s["paired_steps"]
            delta = f"{_delta(p)} (n = {p.n})"
            faster = f"{p.better} / {p.worse}"
            seconds = _delta(s["paired_seconds"])
            area_delta = _delta(s["paired_area"])
        lines.append(
            f"| {name} | {s['learning_rate']:g} | {s['curves']} | {s['reached']} of "
            f"{s['curves']} | {_pm(s['steps'])} | {delta} | {faster} | {seconds} | "
            f"{_pm(s['area'])} | {area_delta} |")
    return "\n".join(lines)


def rate_table(rows: Sequence[Mapping[str, Any]], task: str, chosen: Mapping[str, tuple],
               learning_rates: Sequence[float]) -> str:
    """Every arm at every learning rate: final dev and test metric, and, where runs logged
    curves, how many reached the target and in how many steps."""
    final = report_rows(rows, task)
    curves = curve_rows(rows, task)
    picked = {value for value in chosen.values()}
    lines = [
        f"| arm | learning rate | runs | dev {METRIC[task]} | test {METRIC[task]} | "
        "final train loss | runs with curves | reached the target | steps to target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rates = sorted({r["learning_rate"] for r in final} | set(learning_rates), reverse=True)
    for arm in ARMS:
        for rate in rates:
            mine = [r for r in final if r["arm"] == arm.name and r["learning_rate"] == rate]
            if not mine:
                continue
            mark = " **(chosen)**" if (arm.name, rate) in picked else ""
            with_curve = [r for r in curves if r["arm"] == arm.name and r["learning_rate"] == rate]
            reached = [r["steps_to_target"] for r in with_curve
                       if r["steps_to_target"] is not None]
            losses = [r["final_train_loss"] for r in mine if r["final_train_loss"] is not None]
            lines.append(
                f"| {arm.name} | {rate:g}{mark} | {len(mine)} | "
                f"{_pm(harness.mean_sd([r['dev_metric'] for r in mine]))} | "
                f"{_pm(harness.mean_sd([r['test_metric'] for r in mine]))} | "
                f"{harness.fmt(harness.mean_sd(losses)[0], 3)} | {len(with_curve) or '—'} | "
                + (f"{len(reached)} of {len(with_curve)} | {_pm(harness.mean_sd(reached))} |"
                   if with_curve else "— | — |"))
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], summaries: Mapping[str, Mapping], out: Path,
         learning_rates: Sequence[float], grid_seed_counts: Mapping[str, int]) -> list[Path]:
    plt = harness.pyplot()

    tasks = [task for task in TASKS if summaries.get(task)]
    paths = []
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        summary = summaries[task]
        for label, s in summary["arms"].items():
            curves = [r["curve"] for r in curve_rows(rows, task)
                      if r["arm"] == s["arm"] and r["learning_rate"] == s["learning_rate"]]
            steps = sorted({int(p[0]) for c in curves for p in c})
            stats = [harness.mean_se([p[1] for c in curves for p in c if p[0] == step])
                     for step in steps]
            mean = [m for m, _ in stats]
            se = [0 if math.isnan(e) else e for _, e in stats]
            name = display(label, s["arm"])
            line, = ax.plot(steps, mean, marker=".", label=f"{name}, lr {s['learning_rate']:g}")
            ax.fill_between(steps, [m - 2 * e for m, e in zip(mean, se)],
                            [m + 2 * e for m, e in zip(mean, se)], alpha=0.15,
                            color=line.get_color())
        ax.axhline(summary["target"], color="grey", linestyle="--", linewidth=1,
                   label=f"target {summary['target']:.1f}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"dev {METRIC[task]}")
        ax.set_title(f"{task}: dev metric during training, each arm at its chosen rate\n"
                     "(mean ± 2 s.e. over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    paths.append(harness.save_figure(fig, out / "learning_curves.png"))

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        grid = grid_rows(rows, task, learning_rates, grid_seed_counts[task])
        chosen = {s["arm"]: s["learning_rate"] for s in summaries[task]["arms"].values()}
        for i, arm in enumerate(ARMS):
            rates = sorted({r["learning_rate"] for r in grid if r["arm"] == arm.name})
            stats = [harness.mean_se([r["dev_metric"] for r in grid
                                      if r["arm"] == arm.name and r["learning_rate"] == rate])
                     for rate in rates]
            shift = 1 + 0.03 * (i - 1.5)
            line = ax.errorbar([rate * shift for rate in rates], [m for m, _ in stats],
                               yerr=[0 if math.isnan(e) else 2 * e for _, e in stats],
                               marker="o", markersize=4, capsize=3, label=arm.name)
            if arm.name in chosen:
                best = rates.index(chosen[arm.name])
                ax.plot([rates[best] * shift], [stats[best][0]], marker="*", markersize=14,
                        color=line[0].get_color(), linestyle="none")
        harness.learning_rate_axis(ax, learning_rates)
        ax.set_ylabel(f"final dev {METRIC[task]}")
        ax.set_title(f"{task}: final dev metric against the learning rate\n(mean ± 2 s.e. over "
                     f"seeds {', '.join(map(str, summaries[task]['grid_seeds']))}; "
                     "★ = chosen)", fontsize=9)
        ax.legend(fontsize=7)
    paths.append(harness.save_figure(fig, out / "metric_vs_learning_rate.png"))
    return paths


# ---------------------------------------------------------------- the study


class SpeedStudy(harness.Study):
    """Speed to a dev target and the stable learning-rate range, per task and arm."""

    module = "studies.study_speed"
    out = "docs/study/speed"
    defaults = DEFAULTS
    growable = GROWABLE
    arms = ARMS

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS),
                            help="train only these tasks (the report covers every task)")

    def check_arguments(self, args: argparse.Namespace) -> None:
        for key, value in DEFAULTS.items():
            if isinstance(value, int) and getattr(args, key) < 1:
                raise SystemExit(f"--{key} must be at least 1, got {getattr(args, key)}")
        if any(not rate > 0 for rate in args.learning_rates):
            raise SystemExit(f"--learning_rates must be positive, got {args.learning_rates}")
        if not 0 < args.target_fraction <= 1:
            raise SystemExit(f"--target_fraction must be in (0, 1], got {args.target_fraction}")
        if getattr(args, "arms", None) and set(args.arms) != set(ARMS_BY_NAME):
            # the later runs need every arm's grid (the choice compares them all)
            raise SystemExit("--arms: this study needs all its arms (the DropGrad arm and every "
                             "learning rate are chosen among them)")

    def grown(self, args: argparse.Namespace, old: Mapping[str, Any]) -> dict[str, Any]:
        return {**{key: max(getattr(args, key), old.get(key, 0))
                   for key in ("seeds", "grid_seeds_classification", "grid_seeds_seq2seq")},
                "learning_rates": sorted(args.learning_rates, reverse=True)}

    def store(self, out: Path) -> SpeedStore:
        return SpeedStore(out)

    def jobs(self, args: argparse.Namespace) -> Iterator[harness.Job]:
        """Per task: the grid, seed-major (seed, learning rate, arm); then, once the grid is
        complete, every arm at its chosen rate with a curve, seed by seed."""
        store = self.store(args.out)
        for task in TASKS:
            if task not in args.tasks:
                continue
            with_curve = grid_with_curve(task)
            grid_jobs = [self._job(task, arm.name, rate, seed, with_curve, args)
                         for seed in range(getattr(args, f"grid_seeds_{task}"))
                         for rate in args.learning_rates for arm in ARMS]
            yield from grid_jobs
            store.wait_for(job.key for job in grid_jobs)  # other workers' last grid runs
            grid = grid_rows(store.load(), task, args.learning_rates,
                             getattr(args, f"grid_seeds_{task}"))
            if {r["seed"] for r in grid} != set(range(getattr(args, f"grid_seeds_{task}"))):
                print(f"{task}: the grid is not complete (a run failed or stopped); rerun the "
                      "same command to train the missing runs and then the chosen rates",
                      flush=True)
                continue
            chosen = choose(grid)
            for seed in range(args.seeds):
                for arm, rate in chosen.values():
                    yield self._job(task, arm, rate, seed, True, args)

    def _job(self, task: str, arm: str, rate: float, seed: int, with_curve: bool,
             args: argparse.Namespace) -> harness.Job:
        label = (f"{task:>14} {arm:>22} lr {rate:<8g} seed {seed}"
                 + (" (curve)" if with_curve else ""))
        return harness.Job((task, arm, rate, seed, with_curve), label,
                           lambda log: train_one(task, arm, rate, seed, with_curve, args, log))

    def describe(self, row: dict) -> str:
        cpu = f", {row['cpu_seconds']:.0f} s CPU" if row["cpu_seconds"] is not None else ""
        return (f"dev {row['dev_metric']:.1f}, test {row['test_metric']:.1f}, train loss "
                f"{row['final_train_loss']:.3f} ({row['seconds']:.0f} s{cpu}; {row['source']})")

    def report(self, out: Path, meta: Mapping[str, Any]) -> str:
        """summary.md and the plots, computed from the results alone."""
        settings, rates, grid_seed_counts = resolved(meta)
        rows = derive(self.store(out).load(), settings, rates, grid_seed_counts)
        seeds = meta.get("seeds", DEFAULTS["seeds"])
        summaries = {task: task_summary(rows, task, rates, seeds, grid_seed_counts[task])
                     for task in TASKS}
        fresh = [r for r in rows if r["source"] == "this study"]
        parts = [
            "# Does DropGrad accelerate optimization? (generated by studies/study_speed.py)\n",
            f"Command: `{meta.get('command', 'python -m studies.study_speed')}`; this file and "
            "the plots, recomputed from results.json / results.csv: "
            "`python -m studies.study_speed --report`.\n",
            f"Learning rates {', '.join(f'{rate:g}' for rate in rates)} "
            f"({max(rates) / min(rates):g}x from lowest to highest). Grid seeds: classification "
            f"0 to {grid_seed_counts['classification'] - 1}, seq2seq 0 to "
            f"{grid_seed_counts['seq2seq'] - 1}; at each arm's chosen rate seeds 0 to {seeds - 1}, "
            f"with curves. Target: {settings['target_fraction']:g} x the tuned baseline's mean "
            "final dev metric.\n",
            f"Runs: {len(rows)} ({len(rows) - len(fresh)} reused from studies/study_tuned.py), "
            f"{sum(r['seconds'] for r in fresh) / 60:.1f} min of wall time and "
            f"{sum(r['cpu_seconds'] or 0 for r in fresh) / 60:.1f} min of CPU time for the "
            f"{len(fresh)} trained here.\n",
            "Metrics in percent, final (after the last step) unless said otherwise; mean ± sd "
            "over seeds. Paired Δ: per-seed difference to the tuned baseline (the baseline at "
            "its own chosen rate) of the same seed, mean ± standard error; seeds better / "
            "worse (faster / slower): in how many seeds the arm beat / lost to it.\n",
        ]
        for task in TASKS:
            summary = summaries[task]
            parts.append(f"## {task}\n")
            if task == "classification":
                parts.append(
                    f"Settings: {settings['max_train_samples']} training definitions, "
                    f"{settings['epochs']} epochs at batch {settings['batch_size']}, inputs "
                    f"truncated to {settings['max_seq_length']} tokens; dev = "
                    f"{settings['dev_samples']} definitions, test = the next "
                    f"{settings['test_samples']}; curves: dev every {settings['eval_steps']} "
                    "steps. Metric: accuracy %.\n")
            else:
                parts.append(
                    f"Settings: {settings['s2s_max_steps']} steps at batch "
                    f"{settings['s2s_batch_size']} on the whole training split; dev = "
                    f"{settings['s2s_dev_samples']} words, test = the next "
                    f"{settings['s2s_test_samples']}; every run logs dev every "
                    f"{settings['s2s_eval_steps']} steps. Metric: teacher-forced next-phoneme "
                    "accuracy %.\n")
            missing = missing_runs(rows, task, rates, seeds, grid_seed_counts[task], summary)
            parts.append(f"**{missing} runs missing** (rerun the command to resume).\n"
                         if missing else "All runs finished.\n")
            if not summary:
                parts.append("(no seed has run the whole grid yet)\n")
                continue
            choice = ", ".join(f"{arm} best at {rate:g} (dev {value:.1f})"
                               for arm, (rate, value) in summary["dropgrad_choice"].items())
            parts += [
                f"Choices over grid seeds {', '.join(map(str, summary['grid_seeds']))}. "
                f"DropGrad's p, on dev: {choice}. Target: dev {METRIC[task]} ≥ "
                f"{summary['target']:.2f}.\n",
                "### Each arm at its chosen learning rate, and its stable range\n",
                chosen_table(summary, task) + "\n",
                "### Speed: steps to the target at the chosen rates\n",
                speed_table(summary, task) + "\n",
                "### Every arm at every learning rate\n",
                rate_table(rows, task, {k: (s["arm"], s["learning_rate"])
                                        for k, s in summary["arms"].items()}, rates) + "\n",
            ]
        if any(summaries.values()):
            paths = plot(rows, summaries, out, rates, grid_seed_counts)
            parts += [f"![{path.stem.replace('_', ' ')}]({path.name})\n" for path in paths]
        text = "\n".join(parts)
        harness.atomic_write(out / "summary.md", text)
        return text


def missing_runs(rows: Sequence[Mapping[str, Any]], task: str, learning_rates: Sequence[float],
                 seeds: int, grid_seed_count: int, summary: Mapping[str, Any]) -> int:
    """How many runs of a task are still to train (the chosen rates' ones counted once the
    grid has chosen them)."""
    have = {(r["arm"], r["learning_rate"], r["seed"], r["with_curve"]) for r in rows
            if r["task"] == task}
    want = {(arm.name, rate, seed, grid_with_curve(task)) for arm in ARMS
            for rate in learning_rates for seed in range(grid_seed_count)}
    for s in summary.get("arms", {}).values():
        want |= {(s["arm"], s["learning_rate"], seed, True) for seed in range(seeds)}
    return len(want - have)


STUDY = SpeedStudy()
main = STUDY.main

if __name__ == "__main__":
    main()

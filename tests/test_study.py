"""studies/study.py, studies/study_overfit.py and their shared studies/study_harness.py.

The examples apply DropGrad by default, so a baseline that only omits the DropGrad flags
silently trains with the example's rates. These tests pin the flags of every configuration and
the check that compares them with what the callback logged, and the harness's results store,
statistics and protocol: every study's summary is recomputed, byte for byte, from its
committed results.
"""

from __future__ import annotations

import importlib
import io
import math
import pkgutil
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

import studies
from studies import study
from studies import study_harness as harness
from studies import study_overfit as overfit
from tests.study_helpers import require_offline_data

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- studies/study_harness.py


def test_mean_sd_of_one_value_is_undefined_not_zero():
    # One run says nothing about the spread: the two former copies (mean_sd, mean_std)
    # disagreed here, one answering 0.0, which printed "± 0.0000" for a single seed.
    assert harness.mean_sd([]) == pytest.approx((math.nan, math.nan), nan_ok=True)
    m, sd = harness.mean_sd([0.4])
    assert m == 0.4 and math.isnan(sd)
    m, se = harness.mean_se([0.4])
    assert m == 0.4 and math.isnan(se)
    assert harness.mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert harness.mean_se([1.0, 3.0]) == (2.0, pytest.approx(1.0))
    assert harness.fmt(math.nan) == "—" and harness.fmt(1.25, 2, sign=True) == "+1.25"


def test_paired_compares_seed_by_seed():
    diff = harness.paired({0: 0.55, 1: 0.60, 2: 0.90, 3: 0.40}, {0: 0.50, 1: 0.60, 3: 0.45})
    assert (diff.better, diff.worse, diff.n) == (1, 1, 3)  # seed 2 has no reference
    assert diff.mean == pytest.approx(0.0) and diff.se == pytest.approx(0.05 / math.sqrt(3))
    lower = harness.paired({0: 1.0, 1: 2.0}, {0: 2.0, 1: 2.5}, lower_is_better=True)
    assert (lower.better, lower.worse) == (2, 0) and lower.mean == pytest.approx(-0.75)


def test_result_store_csv_round_trip_and_claims(tmp_path):
    store = harness.ResultStore(tmp_path, ("arm", "seed"), ["arm", "seed", "acc", "flag"],
                                sort_key=lambda r: (r["seed"], r["arm"]), keep_json=False,
                                field_types={"seed": int, "acc": float, "flag": bool})
    store.append({"arm": "b", "seed": 1, "acc": 0.25, "flag": True})
    assert store.claim(("b", 1)) is None  # finished
    held = store.claim(("a", 0))
    assert held is not None and held.read_text().isdigit()
    assert store.claim(("a", 0)) is None  # held by a live process (this one)
    held.write_text("999999999")  # a claim of a process that no longer runs is taken over
    assert store.claim(("a", 0)) == held
    rows = store.append({"arm": "a", "seed": 0, "acc": 0.5, "flag": False})
    assert rows == store.load() == [{"arm": "a", "seed": 0, "acc": 0.5, "flag": False},
                                    {"arm": "b", "seed": 1, "acc": 0.25, "flag": True}]


def test_wait_for_waits_only_for_runs_another_live_worker_holds(tmp_path):
    store = harness.ResultStore(tmp_path, ("arm", "seed"), ["arm", "seed"], keep_json=False,
                                field_types={"seed": int})
    store.append({"arm": "a", "seed": 0})
    assert store.claim(("b", 0)) is not None
    (tmp_path / "claims" / "b_0").write_text("999999999")  # a worker that no longer runs
    store.wait_for([("a", 0), ("b", 0), ("c", 0)], poll_seconds=0.01)  # returns at once

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "claims" / "b_0").write_text(str(other.pid))  # a live worker trains b
        finisher = threading.Timer(0.3, lambda: store.append({"arm": "b", "seed": 0}))
        start = time.monotonic()
        finisher.start()
        store.wait_for([("a", 0), ("b", 0)], poll_seconds=0.01)
        assert time.monotonic() - start >= 0.25  # it waited for b's row
        assert {r["arm"] for r in store.load()} == {"a", "b"}

        (tmp_path / "claims" / "c_0").write_text(str(other.pid))
        threading.Timer(0.3, lambda: (other.kill(), other.wait())).start()
        store.wait_for([("c", 0)], poll_seconds=0.01)  # the worker died: c is left missing
        assert other.poll() is not None
    finally:
        other.kill()
        other.wait()


def _fake_example(fail: bool = False) -> SimpleNamespace:
    """An example whose ``main`` prints its table and saves a trainer state in --output_dir."""

    def main(argv: list[str]) -> None:
        output_dir = Path(argv[argv.index("--output_dir") + 1])
        print("the example's table")
        (output_dir / "trainer_state.json").write_text('{"log_history": [{"step": 2}]}')
        if fail:
            raise RuntimeError("training failed")

    return SimpleNamespace(main=main)


def test_run_example_captures_reads_and_always_removes_its_folder(tmp_path, monkeypatch, capsys):
    seen: list[Path] = []

    def read(output_dir: Path, history: list[dict]) -> int:
        seen.append(output_dir)
        assert output_dir.parent == tmp_path and output_dir.name.startswith("toy_")
        return len(list(output_dir.iterdir()))

    monkeypatch.setattr(harness, "load_example", lambda name: _fake_example())
    log = io.StringIO()
    run = harness.run_example("toy", lambda out: ["--output_dir", str(out)], read, log,
                              str(tmp_path), prefix="toy_")
    assert run.history == [{"step": 2}] and run.result == 1
    assert run.seconds >= 0 and run.cpu_seconds >= 0
    assert log.getvalue() == "the example's table\n" and capsys.readouterr().out == ""
    assert not seen[0].exists()  # the weights of every run do not pile up in scratch

    monkeypatch.setattr(harness, "load_example", lambda name: _fake_example(fail=True))
    with pytest.raises(RuntimeError, match="training failed"):
        harness.run_example("toy", lambda out: ["--output_dir", str(out)], read, log,
                            str(tmp_path), prefix="toy_")
    assert list(tmp_path.iterdir()) == []  # removed when training fails too


class ToyStudy(harness.Study):
    """A study without training: the protocol's smallest instance."""

    module = "tests.test_study"
    defaults: ClassVar[dict] = {"seeds": 2, "scale": 1.0}
    arms = (harness.Config("a"), harness.Config("b"))

    def __init__(self) -> None:
        self.trained: list[tuple[str, int]] = []

    def store(self, out: Path) -> harness.ResultStore:
        return harness.ResultStore(out, ("arm", "seed"), ["arm", "seed", "value"],
                                   sort_key=lambda r: (r["seed"], r["arm"]), keep_json=False,
                                   field_types={"seed": int, "value": float})

    def train(self, arm: str, seed: int, scale: float) -> dict:
        self.trained.append((arm, seed))
        return {"arm": arm, "seed": seed, "value": scale * seed}

    def jobs(self, args):
        for seed in range(args.seeds):
            for arm in self.selected_arms(args):
                yield harness.Job((arm.name, seed), f"{arm.name} seed {seed}",
                                  lambda log, a=arm.name, s=seed: self.train(a, s, args.scale))

    def describe(self, row: dict) -> str:
        return f"value {row['value']}"

    def report(self, out: Path, meta) -> str:
        rows = self.store(out).load()
        text = f"{len(rows)} runs, seeds 0 to {meta['seeds'] - 1}: {[r['value'] for r in rows]}\n"
        harness.atomic_write(out / "summary.md", text)
        return text


def test_the_protocol_resumes_grows_refuses_and_reports(tmp_path):
    toy = ToyStudy()
    out = ["--out", str(tmp_path)]
    toy.main([*out, "--arms", "b"])
    assert toy.trained == [("b", 0), ("b", 1)]
    rows = toy.main(out)  # resumed: only the other arm trains
    assert toy.trained[2:] == [("a", 0), ("a", 1)]
    assert [(r["arm"], r["seed"]) for r in rows] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    toy.main([*out, "--seeds", "3"])  # seeds may grow
    assert toy.trained[4:] == [("a", 2), ("b", 2)]
    with pytest.raises(SystemExit, match="other settings"):
        toy.main([*out, "--scale", "2"])
    meta = harness.read_meta(tmp_path)
    assert meta["settings"] == {"scale": 1.0} and meta["seeds"] == 3
    assert meta["command"] == f"python -m tests.test_study --out {tmp_path} --seeds 3"
    assert set(meta["machine"]) == {"torch", "cpu_count"}
    summary = (tmp_path / "summary.md").read_text()
    (tmp_path / "summary.md").unlink()
    assert len(toy.main([*out, "--report"])) == 6 and len(toy.trained) == 6  # no training
    assert (tmp_path / "summary.md").read_text() == summary == (
        "6 runs, seeds 0 to 2: [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]\n")


def _study_modules() -> list:
    """Every study of studies/ (the modules other than the harness)."""
    names = [info.name for info in pkgutil.iter_modules(studies.__path__)]
    return [importlib.import_module(f"studies.{name}") for name in sorted(names)
            if name != "study_harness"]


def test_every_study_follows_the_protocol():
    makefile = (ROOT / "Makefile").read_text()
    modules = _study_modules()
    assert {"studies.study", "studies.study_overfit", "studies.study_tuned"} <= {
        m.__name__ for m in modules}  # and any study added since
    for module in modules:
        assert isinstance(module.STUDY, harness.Study), module.__name__
        assert module.STUDY.module == module.__name__ and module.main == module.STUDY.main
        assert module.STUDY.out.startswith("docs/study") and module.STUDY.arms
        assert f"-m {module.__name__}" in makefile, f"no Makefile target runs {module.__name__}"


@pytest.mark.parametrize("module", _study_modules(), ids=lambda m: m.__name__)
def test_every_summary_recomputes_from_the_committed_results(module, tmp_path):
    """summary.md, rebuilt from the committed results file and study_meta.json alone (no
    training), is the committed one byte for byte."""
    pytest.importorskip("matplotlib")
    folder = ROOT / module.STUDY.out
    if not (folder / "study_meta.json").exists():
        pytest.skip(f"{folder} holds no results yet")
    for path in folder.iterdir():
        if path.is_file():
            shutil.copy(path, tmp_path / path.name)
    (tmp_path / "summary.md").unlink()
    module.main(["--report", "--out", str(tmp_path)])
    assert (tmp_path / "summary.md").read_text() == (folder / "summary.md").read_text()


def test_expected_rate_logs_of_every_configuration():
    expected = {
        (task, config.name): harness.expected_rate_logs(config)
        for task, configs in (
            ("seq2seq", study.SEQ2SEQ_CONFIGS),
            ("classification", study.CLASSIFICATION_CONFIGS),
        )
        for config in configs
    }
    assert expected == {
        ("seq2seq", "baseline"): {},
        ("seq2seq", "both p=0.1"): {"dropgrad_rate/encoder": 0.1, "dropgrad_rate/decoder": 0.1},
        ("seq2seq", "both p=0.3"): {"dropgrad_rate/encoder": 0.3, "dropgrad_rate/decoder": 0.3},
        ("seq2seq", "both p=0.5"): {"dropgrad_rate/encoder": 0.5, "dropgrad_rate/decoder": 0.5},
        ("seq2seq", "encoder p=0.3"): {"dropgrad_rate/encoder": 0.3},
        ("seq2seq", "decoder p=0.3"): {"dropgrad_rate/decoder": 0.3},
        ("seq2seq", "both p=0.3 full"): {
            "dropgrad_rate/encoder": 0.3,
            "dropgrad_rate/decoder": 0.3,
        },
        ("classification", "baseline"): {},
        ("classification", "all p=0.1"): {"dropgrad_rate": 0.1},
        ("classification", "all p=0.3"): {"dropgrad_rate": 0.3},
    }


def test_baselines_switch_off_the_examples_default_rates():
    # Without these flags the flagship trains with encoder=0.1,decoder=0.2 and the classifier
    # with 0.1: the "baseline" would not be one.
    seq2seq = study.SEQ2SEQ_CONFIGS[0]
    classification = study.CLASSIFICATION_CONFIGS[0]
    assert seq2seq.name == classification.name == "baseline"
    assert seq2seq.flags == ("--dropgrad_rate", "0", "--dropgrad_module_rates", "")
    assert classification.flags == ("--dropgrad_rate", "0")


def test_check_rates_accepts_what_the_configuration_asks_for(tmp_path):
    both = study.SEQ2SEQ_CONFIGS[2]
    history = [
        {"step": 6, "loss": 3.0, "dropgrad_rate/encoder": 0.3, "dropgrad_rate/decoder": 0.3},
        {"step": 12, "loss": 2.0, "dropgrad_rate/encoder": 0.3, "dropgrad_rate/decoder": 0.3},
        {"step": 12, "eval_loss": 2.5},
    ]
    harness.check_rates(both, history, tmp_path)
    # a baseline may log rate 0 (DropGrad installed as an exact no-op) or nothing at all
    harness.check_rates(study.SEQ2SEQ_CONFIGS[0], [{"step": 6, "dropgrad_rate": 0.0}], tmp_path)
    harness.check_rates(study.SEQ2SEQ_CONFIGS[0], [{"step": 6, "loss": 1.0}], tmp_path)


@pytest.mark.parametrize(
    ("index", "history", "match"),
    [
        # the bug this guards against: a baseline that trained with the example's default rates
        (0, [{"step": 6, "dropgrad_rate/encoder": 0.1, "dropgrad_rate/decoder": 0.2}], "absent"),
        # encoder-only that also dropped the decoder's gradients
        (4, [{"step": 6, "dropgrad_rate/encoder": 0.3, "dropgrad_rate/decoder": 0.2}], "encoder"),
        # the right patterns at the wrong rate
        (2, [{"step": 6, "dropgrad_rate/encoder": 0.1, "dropgrad_rate/decoder": 0.1}], "0.3"),
        # DropGrad never installed in an arm that asks for it
        (1, [{"step": 6, "loss": 1.0}], "0.1"),
    ],
)
def test_check_rates_rejects_a_run_with_other_rates(tmp_path, index, history, match):
    with pytest.raises(RuntimeError, match=match):
        harness.check_rates(study.SEQ2SEQ_CONFIGS[index], history, tmp_path)


# ---------------------------------------------------------------- studies/study_overfit.py


def test_overfit_arms_are_wired_as_named():
    arms = {arm.name: arm for arm in overfit.ARMS}
    assert list(arms) == [
        "baseline", "p=0.1", "p=0.3", "p=0.5", "p=0.6", "p=0.7", "p=0.8",
        "p=0.5 full update drop", "weight decay 0.1", "model dropout 0.2",
        "learning rate x0.5",
    ]
    expected_logs = {name: harness.expected_rate_logs(arm.config) for name, arm in arms.items()}
    assert expected_logs == {
        "baseline": {}, "p=0.1": {"dropgrad_rate": 0.1}, "p=0.3": {"dropgrad_rate": 0.3},
        "p=0.5": {"dropgrad_rate": 0.5}, "p=0.6": {"dropgrad_rate": 0.6},
        "p=0.7": {"dropgrad_rate": 0.7}, "p=0.8": {"dropgrad_rate": 0.8},
        "p=0.5 full update drop": {"dropgrad_rate": 0.5},
        "weight decay 0.1": {}, "model dropout 0.2": {}, "learning rate x0.5": {},
    }
    # every arm without DropGrad switches off the example's default rate (0.1) explicitly
    for arm in arms.values():
        assert arm.flags[:2] == ("--dropgrad_rate", f"{arm.drop_rate:g}")
    assert [a.name for a in arms.values() if a.full_update_drop] == ["p=0.5 full update drop"]
    assert {a.name: a.weight_decay for a in arms.values() if a.weight_decay != 0.01} == {
        "weight decay 0.1": 0.1}
    assert {a.name: a.model_dropout for a in arms.values() if a.model_dropout != 0.1} == {
        "model dropout 0.2": 0.2}
    assert {a.name: a.learning_rate_factor for a in arms.values()
            if a.learning_rate_factor != 1} == {"learning rate x0.5": 0.5}
    args = SimpleNamespace(epochs=3, max_train_samples=8, max_eval_samples=8, batch_size=2,
                           learning_rate=1e-3, max_seq_length=16)
    argv = overfit.run_argv(arms["learning rate x0.5"], 5, args, Path("out"))
    assert argv[argv.index("--learning_rate") + 1] == "0.0005"
    assert argv[argv.index("--seed") + 1] == "5"
    argv = overfit.run_argv(arms["p=0.7"], 5, args, Path("out"))
    assert argv[argv.index("--learning_rate") + 1] == "0.001"
    assert argv[-2:] == ["--dropgrad_rate", "0.7"]  # the arm's flags come last and win


def test_overfit_paired_differences():
    rows = [
        {"arm": "baseline", "seed": 0, "x": 0.50}, {"arm": "baseline", "seed": 1, "x": 0.60},
        {"arm": "p=0.7", "seed": 0, "x": 0.55}, {"arm": "p=0.7", "seed": 1, "x": 0.60},
        {"arm": "p=0.7", "seed": 2, "x": 0.90},  # no baseline for seed 2: not paired
    ]
    mean, se, better, worse, n = overfit.paired(rows, "p=0.7", "x")
    assert (better, worse, n) == (1, 0, 2)
    assert mean == pytest.approx(0.025) and se == pytest.approx(0.025)


#: One arm of each kind (DropGrad, full update drop, weight decay, model dropout, learning
#: rate) and the baseline: a real run of every kind of flag the study passes, a few seconds
#: each.
TINY_ARMS = ["baseline", "p=0.7", "p=0.5 full update drop", "weight decay 0.1",
             "model dropout 0.2", "learning rate x0.5"]


@pytest.mark.slow
def test_overfit_study_tiny_run(tmp_path):
    """Each kind of arm trains for real on a tiny setting, its rates and settings verified
    per run; a second call resumes (trains nothing) and the report is rebuilt."""
    require_offline_data()
    out = tmp_path / "out"
    argv = ["--seeds", "2", "--epochs", "2", "--max_train_samples", "2", "--batch_size", "2",
            "--max_eval_samples", "2", "--max_seq_length", "8", "--arms", *TINY_ARMS,
            "--out", str(out), "--scratch", str(tmp_path)]
    rows = overfit.main(argv)
    assert [(r["arm"], r["seed"]) for r in rows] == [
        (arm, seed) for seed in (0, 1) for arm in TINY_ARMS]  # seed-major, arms in order
    for row in rows:
        arm = overfit.ARMS_BY_NAME[row["arm"]]
        assert (row["drop_rate"], row["full_update_drop"], row["weight_decay"],
                row["model_dropout"]) == (arm.drop_rate, arm.full_update_drop,
                                          arm.weight_decay, arm.model_dropout)
        assert [p["epoch"] for p in row["curve"]] == [1, 2] and row["steps"] == 2
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].startswith("task,arm,seed,drop_rate,") and len(lines) == 1 + len(rows)
    assert overfit.main(argv) == rows  # resumed: nothing left to train
    summary = (out / "summary.md").read_text()
    assert "| p=0.7 | 2 |" in summary and "Missing runs" in summary  # 6 of the 11 arms
    assert (out / "accuracy_vs_rate.png").exists() and (out / "learning_curves.png").exists()


def test_overfit_append_row_keeps_other_workers_rows(tmp_path):
    row = {"task": "classification", "arm": "p=0.1", "seed": 1, "curve": []}
    store = overfit.STUDY.store(tmp_path)
    store.append(dict(row, seed=1))
    overfit.STUDY.store(tmp_path).append(dict(row, arm="baseline", seed=0))  # another worker
    rows = store.append(dict(row, seed=0))
    assert [(r["arm"], r["seed"]) for r in rows] == [("baseline", 0), ("p=0.1", 0),
                                                     ("p=0.1", 1)]
    assert store.load() == rows and rows[0]["curve"] == []  # results.json keeps the curves
    assert (tmp_path / "results.csv").read_text().count("\n") == 4


def test_overfit_verify_run_rejects_other_settings(tmp_path):
    import torch

    from hf_dropgrad import DropGradTrainingArguments

    args = DropGradTrainingArguments(str(tmp_path), weight_decay=0.01, dropgrad_rate=0.5,
                                     dropgrad_full_update_drop=False, use_cpu=True)
    torch.save(args, tmp_path / "training_args.bin")
    (tmp_path / "config.json").write_text(
        '{"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}')
    history = [{"step": 2, "loss": 1.0, "dropgrad_rate": 0.5}]
    overfit.verify_run(overfit.ARMS_BY_NAME["p=0.5"], tmp_path, history)
    overfit.verify_run(overfit.ARMS_BY_NAME["p=0.5"], tmp_path, history, args.learning_rate)
    with pytest.raises(RuntimeError, match="learning_rate"):  # ran at the study's rate
        overfit.verify_run(overfit.ARMS_BY_NAME["learning rate x0.5"], tmp_path,
                           [{"step": 2, "loss": 1.0}], args.learning_rate)
    with pytest.raises(RuntimeError, match="full_update_drop"):
        overfit.verify_run(overfit.ARMS_BY_NAME["p=0.5 full update drop"], tmp_path, history)
    with pytest.raises(RuntimeError, match=r"0\.7"):
        overfit.verify_run(overfit.ARMS_BY_NAME["p=0.7"], tmp_path, history)

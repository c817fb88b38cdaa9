"""Exact DropGrad under FSDP2 (``fully_shard``): 2 gloo processes against 1 process.

One ``torchrun`` launch of ``tests/distributed_scripts/fsdp2_train.py`` runs every 2-process
case and one plain ``python`` run the 1-process ones (see the script for the setup). What is
compared, and why:

- SGD without momentum updates an element by ``-lr * masked gradient``, so the elements whose
  value did not change at a step are the dropped ones plus those whose gradient was zero anyway.
  That set must be *identical* in 1 and 2 processes at every step; it must equal the oracle
  (the full-parameter mask drawn by the pure-torch reference, per parameter, with the module's
  scheduled rate, plus the 1-process zero gradients); parameters must agree to float tolerance
  (only the order of the gradient sums differs).
- The negative control masks each shard as if it started at element 0: rank 1's dropped set
  is then wrong, and the same comparison fails.
- Full update drop with AdamW (momentum and weight decay move every element): the frozen
  elements are the dropped ones, the same in 1 and 2 processes.
- Through the ``Trainer``: a ``DropGradTrainer`` under FSDP2 prepared by Accelerate (forced
  on this CPU machine, see ``tests/distributed_scripts/sharded_trainer.py``), which replaces the
  parameters in the optimizer's ``param_groups`` by their shards after DropGrad resolved the
  per-module rates: the dropped elements equal those of a 1-process ``DropGradTrainer`` run.
- Resume: 2 steps, a checkpoint of the full parameters and ``DropGrad.state_dict()``, a new
  model sharded again and a new ``DropGrad`` with another seed, 2 more steps: bit-identical to
  the uninterrupted run.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")

from tests.sharded_helpers import (
    FACTORS,
    ROOT,
    TRAINER_SCRIPT,
    Runs,
    launch,
    oracle_dropped,
    torchrun,
    unchanged,
)

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "tests" / "distributed_scripts" / "fsdp2_train.py"
TWO = ["sgd", "sgd-nooffset", "adamw-fud", "sgd-resume"]
ONE = ["sgd", "adamw-fud"]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Runs:
    out = tmp_path_factory.mktemp("fsdp2_two")
    launch(torchrun(SCRIPT, out, *TWO))
    return Runs(out)


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Runs:
    out = tmp_path_factory.mktemp("fsdp2_one")
    launch([sys.executable, str(SCRIPT), str(out), *ONE])
    return Runs(out)


def test_the_two_process_run_is_really_sharded(two: Runs) -> None:
    run = two("sgd")
    assert run["world_size"] == 2
    assert run["placements"]["shared.weight"] == "(Shard(dim=0),)"
    assert run["local_numels"]["shared.weight"] == 32 * 16  # of 63 rows: the last shard is 31
    assert two("sgd", 1)["local_numels"]["shared.weight"] == 31 * 16


def test_dropped_elements_equal_the_one_process_run_and_the_oracle(two: Runs, one: Runs) -> None:
    single, sharded = one("sgd"), two("sgd")
    assert [m["step"] for m in sharded["maskings"]] == [0, 1, 2, 3]
    for step in range(4):
        got, want = unchanged(sharded, step), unchanged(single, step)
        oracle = oracle_dropped(single, step)
        for name in want:
            assert torch.equal(got[name], want[name]), (step, name)
            assert torch.equal(want[name], oracle[name] | single["zero_grads"][step][name]), (
                step, name,
            )
        for name, value in single["params"][step].items():
            torch.testing.assert_close(sharded["params"][step][name], value, atol=1e-6, rtol=0)


def test_per_module_rates_are_honoured(two: Runs) -> None:
    run = two("sgd")
    rates = [m["rates"] for m in run["maskings"]]
    assert rates == [
        pytest.approx({"encoder": 0.1 * f, "decoder": 0.3 * f}) for f in FACTORS
    ]
    for masking, factor in zip(run["maskings"], FACTORS):
        for name, rate in masking["per_parameter"].items():
            if name.startswith(("encoder.", "decoder.")):
                expected = 0.1 if name.startswith("encoder.") else 0.3
                assert rate == pytest.approx(expected * factor), name
    # the realised drop fractions at step 0 (dropped = unchanged, nearly all gradients nonzero)
    frozen = unchanged(run, 0)
    for prefix, rate in (("encoder.block", 0.1), ("decoder.block", 0.3)):
        picked = [v for n, v in frozen.items() if n.startswith(prefix)]
        fraction = sum(v.sum().item() for v in picked) / sum(v.numel() for v in picked)
        assert abs(fraction - rate) < 0.04, (prefix, fraction)


def test_ranks_agree(two: Runs) -> None:
    for name in TWO:
        r0, r1 = two(name, 0), two(name, 1)
        for step in range(4):
            for n, value in r0["params"][step].items():
                assert torch.equal(value, r1["params"][step][n]), (name, step, n)


def test_negative_control_masking_shards_without_their_offset_is_caught(two: Runs) -> None:
    right, wrong = two("sgd"), two("sgd-nooffset")
    differing = sum(
        (unchanged(right, 0)[n] != unchanged(wrong, 0)[n]).sum().item() for n in right["initial"]
    )
    assert differing > 100
    # rank 0's shards start at 0 and are right either way: only rank 1's rows differ
    name = "shared.weight"
    rows = unchanged(right, 0)[name] != unchanged(wrong, 0)[name]
    assert not rows[:32].any() and rows[32:].any()


def test_full_update_drop_freezes_the_same_elements(two: Runs, one: Runs) -> None:
    single, sharded = one("adamw-fud"), two("adamw-fud")
    for step in range(4):
        got, want = unchanged(sharded, step), unchanged(single, step)
        oracle = oracle_dropped(single, step)
        for name in want:
            assert torch.equal(got[name], want[name]), (step, name)
            if step > 0:  # AdamW moves every element that is not frozen (momentum, decay)
                assert torch.equal(want[name], oracle[name]), (step, name)
    for name, value in single["params"][-1].items():
        torch.testing.assert_close(sharded["params"][-1][name], value, atol=1e-4, rtol=0)


def test_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_does(two: Runs) -> None:
    resumed, straight = two("sgd-resume"), two("sgd")
    assert [m["step"] for m in resumed["maskings"]] == [0, 1, 2, 3]
    assert resumed["step_count"] == 4
    for step in range(4):
        for name, value in straight["params"][step].items():
            assert torch.equal(resumed["params"][step][name], value), (step, name)


@pytest.fixture(scope="module")
def trainer_two(tmp_path_factory) -> Runs:
    out = tmp_path_factory.mktemp("fsdp2_trainer")
    launch(torchrun(TRAINER_SCRIPT, out, "fsdp2"))
    return Runs(out)


def test_trainer_under_accelerate_fsdp2_equals_the_one_process_trainer(
    trainer_two: Runs, trainer_one_process: Runs
) -> None:
    run, single = trainer_two("fsdp2"), trainer_one_process("single")
    # Accelerate really sharded, and swapped the DTensor shards into the optimizer in place
    assert run["placements"]["shared.weight"] == "(Shard(dim=0),)"
    assert run["optimizer_params"] == ["DTensor"]
    assert run["global_step"] == run["step_count"] == 4
    assert [m["step"] for m in run["maskings"]] == [0, 1, 2, 3]
    for masking, factor in zip(run["maskings"], FACTORS):
        assert masking["rates"] == pytest.approx({"encoder": 0.1 * factor, "decoder": 0.3 * factor})
    for step in range(4):
        got, want = unchanged(run, step), unchanged(single, step)
        oracle = oracle_dropped(single, step)
        for n in want:
            assert torch.equal(got[n], want[n]), (step, n)
            assert torch.equal(want[n], oracle[n] | single["zero_grads"][step][n]), (step, n)
        for n, value in single["params"][step].items():
            torch.testing.assert_close(run["params"][step][n], value, atol=1e-6, rtol=0)
    r1 = trainer_two("fsdp2", 1)
    for n, value in run["params"][-1].items():
        assert torch.equal(value, r1["params"][-1][n]), n

"""Exact DropGrad under DeepSpeed ZeRO-1/2/3 through the ``Trainer``: 2 gloo processes.

One ``torchrun`` launch of ``tests/distributed_scripts/sharded_trainer.py`` runs every
2-process case (``DS_ACCELERATOR=cpu``; the first DeepSpeed run on a machine builds a C++ op,
about 90 s) and one plain ``python`` run the 1-process reference without DeepSpeed (see the
script for the setup). What is compared, and why:

- SGD without momentum updates an element by ``-lr * masked gradient``: the elements whose
  value did not change at a step are the dropped ones plus those whose gradient was zero anyway.
  Under every stage that set is *identical* to the 1-process run's at every step, and equal to
  the oracle (the full-parameter masks drawn by the pure-torch reference with each parameter's
  scheduled rate, plus the 1-process zero gradients); the parameters agree to float tolerance
  (only the order of the gradient sums differs) and the two ranks hold the same parameters.
- ZeRO calls the client optimizer once per parameter group, inside ``backward()``: every
  optimizer step's maskings carry that step's number, and the logged rates follow the schedule.
- The negative control masks ZeRO-3's partitions as if each started at element 0: rank 1's
  dropped set is then wrong and the comparison fails.
- A DeepSpeed config with an ``optimizer`` block and a plain ``Trainer`` with
  ``DropGradCallback``: DropGrad wraps DeepSpeed's own optimizer after its initialisation and
  is exact too.
- Full update drop with AdamW (whose momentum moves every element that is not frozen): the
  frozen elements of ZeRO-2's and ZeRO-3's fp32 partitions are those of the 1-process run.
- Gradient accumulation (2 micro-batches of 2 per process): one mask per optimizer step, on
  the accumulated partition, and the dropped elements of every step are the 1-process run's.
  (The Trainer's update itself is then twice the 1-process one under DeepSpeed, with or
  without DropGrad: a loss-scaling matter of Trainer + DeepSpeed, checked here so that a
  change shows up.)
- A plain DeepSpeed loop (no Trainer) with
  ``hf_dropgrad.integrations.deepspeed.attach_deepspeed``: ZeRO-2 and ZeRO-3 equal the
  1-process run whose optimizer holds the parameters in the same order.
- bf16: the fp32 master gradients are masked, so with SGD every dropped element's bf16 value
  stays put (the oracle's drops are a subset of the unchanged elements, while most others move).
- The shipped ``examples/accelerate_configs/deepspeed_zero2.yaml`` under ``accelerate launch``.
- Resume: a run resumed from the ZeRO-2 or ZeRO-3 checkpoint at step 2 ends bit-identical to the
  uninterrupted run.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

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

# zero2 first: zero2-resume resumes from its checkpoint
TWO = [
    "zero1", "zero2", "zero3", "zero2-callback", "zero2-resume", "zero3-nooffset", "zero2-fud",
    "zero3-fud", "zero2-ga2", "loop-zero2", "loop-zero3", "zero3-resume", "zero2-bf16",
]
EXACT = ["zero1", "zero2", "zero3", "zero2-callback"]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Runs:
    out = tmp_path_factory.mktemp("deepspeed_two")
    launch(torchrun(TRAINER_SCRIPT, out, *TWO), timeout=900, DS_ACCELERATOR="cpu")
    return Runs(out)


@pytest.fixture(scope="module")
def accelerate_two(tmp_path_factory) -> Runs:
    """The shipped GPU config, as a user launches it (DeepSpeed runs on the CPU here)."""
    out = tmp_path_factory.mktemp("deepspeed_accelerate")
    launch([
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "examples" / "accelerate_configs" / "deepspeed_zero2.yaml"),
        "--main_process_port", "{port}", str(TRAINER_SCRIPT), str(out), "zero2-accelerate",
    ], timeout=900, DS_ACCELERATOR="cpu")
    return Runs(out)


@pytest.fixture(scope="module")
def one(trainer_one_process) -> Runs:
    return trainer_one_process


@pytest.mark.parametrize("name", EXACT)
def test_dropped_elements_equal_the_one_process_run_and_the_oracle(
    two: Runs, one: Runs, name: str
) -> None:
    single, run = one("single-callback" if "callback" in name else "single"), two(name)
    assert run["engine"] == "DeepSpeedZeroOptimizer" + ("_Stage3" if "zero3" in name else "")
    for step in range(4):
        got, want = unchanged(run, step), unchanged(single, step)
        oracle = oracle_dropped(single, step)
        for n in want:
            assert torch.equal(got[n], want[n]), (name, step, n)
            assert torch.equal(want[n], oracle[n] | single["zero_grads"][step][n]), (step, n)
        for n, value in single["params"][step].items():
            torch.testing.assert_close(run["params"][step][n], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_partitions_start_inside_parameters(two: Runs, name: str) -> None:
    """The hard case happened: rank 1's share of some parameter starts past its element 0
    (ZeRO-1/2: a parameter straddles the two ranks' partitions; ZeRO-3: every parameter)."""
    segments = two(name, 1)["segments"]
    assert segments
    offsets = [offset for _, _, _, offset in segments]
    if name == "zero3":
        assert all(offset > 0 for offset in offsets)
    else:
        assert any(offset > 0 for offset in offsets)
        assert sum(1 for o in offsets if o > 0) <= 2  # one straddling parameter per group


@pytest.mark.parametrize("name", TWO)
def test_ranks_agree(two: Runs, name: str) -> None:
    r0, r1 = two(name, 0), two(name, 1)
    for step, params in enumerate(r0["params"]):
        for n, value in params.items():
            assert torch.equal(value, r1["params"][step][n]), (name, step, n)


@pytest.mark.parametrize("name", EXACT)
def test_one_step_key_per_optimizer_step_and_scheduled_module_rates(two: Runs, name: str) -> None:
    run = two(name)
    assert run["global_step"] == run["step_count"] == 4
    steps = [m["step"] for m in run["maskings"]]
    # one masking per parameter group (the Trainer makes two: with and without weight decay)
    assert sorted(set(steps)) == [0, 1, 2, 3] and steps == sorted(steps)
    for masking in run["maskings"]:
        factor = FACTORS[masking["step"]]
        assert masking["rates"] == pytest.approx({"encoder": 0.1 * factor, "decoder": 0.3 * factor})
    # what the Trainer logged for each step: the rates that step used
    logged = [r["dropgrad_rate/encoder"] for r in run["logged_rates"]]
    assert logged == pytest.approx([0.1 * f for f in FACTORS])


def test_an_optimizer_block_is_wrapped_after_deepspeed_built_it(two: Runs) -> None:
    run = two("zero2-callback")
    assert run["inner"] == "SGD"  # DeepSpeed's own, built from the config's optimizer block


def test_negative_control_masking_partitions_without_their_offset_is_caught(
    two: Runs, one: Runs
) -> None:
    single, wrong = one("single"), two("zero3-nooffset")
    differing = sum(
        (unchanged(single, 0)[n] != unchanged(wrong, 0)[n]).sum().item() for n in single["initial"]
    )
    assert differing > 100


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_does(
    two: Runs, stage: int
) -> None:
    resumed, straight = two(f"zero{stage}-resume"), two(f"zero{stage}")
    assert resumed["global_step"] == 4 and len(resumed["params"]) == 2
    assert next(m["step"] for m in resumed["maskings"]) == 2
    for step in (2, 3):
        for n, value in straight["params"][step].items():
            assert torch.equal(resumed["params"][step - 2][n], value), (step, n)


@pytest.mark.parametrize("name", ["zero2-fud", "zero3-fud"])
def test_full_update_drop_freezes_the_elements_of_the_one_process_run(
    two: Runs, one: Runs, name: str
) -> None:
    single, run = one("single-fud"), two(name)
    for step in range(4):
        got, want = unchanged(run, step), unchanged(single, step)
        oracle = oracle_dropped(single, step)
        for n in want:
            assert torch.equal(got[n], want[n]), (name, step, n)
            # every dropped element is frozen (others may stay put too: Adam leaves an element
            # whose gradient has always been zero where it is)
            assert not (oracle[n] & ~want[n]).any(), (step, n)
    for n, value in single["params"][-1].items():
        torch.testing.assert_close(run["params"][-1][n], value, atol=1e-4, rtol=0)


def test_gradient_accumulation_masks_once_per_optimizer_step(two: Runs, one: Runs) -> None:
    single, run = one("single"), two("zero2-ga2")
    assert run["global_step"] == 4
    assert sorted({m["step"] for m in run["maskings"]}) == [0, 1, 2, 3]
    assert len(run["maskings"]) == 8  # two groups, not two micro-batches
    for step in range(4):
        got, want = unchanged(run, step), unchanged(single, step)
        for n in want:
            assert torch.equal(got[n], want[n]), (step, n)
    name = "decoder.block.0.layer.0.SelfAttention.q.weight"
    ours = run["params"][0][name] - run["initial"][name]
    theirs = single["params"][0][name] - single["initial"][name]
    torch.testing.assert_close(ours, 2 * theirs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["loop-zero2", "loop-zero3"])
def test_plain_deepspeed_loop_with_attach_deepspeed(two: Runs, one: Runs, name: str) -> None:
    single, run = one("single-callback"), two(name)
    assert run["step_count"] == 4  # ZeRO's step advanced it once per optimizer step
    assert [m["step"] for m in run["maskings"]] == [0, 1, 2, 3]
    for step in range(4):
        got, want = unchanged(run, step), unchanged(single, step)
        for n in want:
            assert torch.equal(got[n], want[n]), (name, step, n)
        for n, value in single["params"][step].items():
            torch.testing.assert_close(run["params"][step][n], value, atol=1e-6, rtol=0)


def test_the_shipped_accelerate_deepspeed_config_is_exact(
    accelerate_two: Runs, one: Runs
) -> None:
    """``accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml``
    (which points at ``ds_zero2.json``, "auto" fields and all) with a Trainer that names no
    DeepSpeed config itself."""
    single, run = one("single"), accelerate_two("zero2-accelerate")
    assert run["engine"] == "DeepSpeedZeroOptimizer"
    for step in range(4):
        got, want = unchanged(run, step), unchanged(single, step)
        for n in want:
            assert torch.equal(got[n], want[n]), (step, n)
    for n, value in single["params"][-1].items():
        torch.testing.assert_close(run["params"][-1][n], value, atol=1e-6, rtol=0)


def test_bf16_masks_the_fp32_master_gradients(two: Runs) -> None:
    run = two("zero2-bf16")
    assert {v.dtype for v in run["params"][0].values()} == {torch.bfloat16}
    for step in range(4):
        frozen = unchanged(run, step)
        oracle = oracle_dropped(run, step)
        moved = sum((~v).sum().item() for v in frozen.values())
        assert moved > 0.5 * sum(v.numel() for v in frozen.values())
        for n in frozen:
            assert not (oracle[n] & ~frozen[n]).any(), (step, n)

"""Exact DropGrad under tensor parallel and 2-D meshes: 2 and 4 gloo processes against 1.

Three launches of ``tests/distributed_scripts/tp_train.py`` (see it for the model, the plans and
the runs): ``torchrun`` with 2 processes (plain torch TP: ``ColwiseParallel`` / ``RowwiseParallel``
with uneven splits and replicated layers; a transformers Llama sharded by its own ``tp_plan``),
with 4 (FSDP2 over TP on a ``(2, 2)`` mesh, HSDP over TP on ``(1, 2, 2)``), and a plain
``python`` run of the same models whole. What is compared, and why:

- Each masked gradient is gathered whole after every step (``full_tensor()``); no activation
  gives exact zeros, so its zeros are the dropped elements (plus embedding rows of tokens absent
  from the batch, the same in every run). The zero sets must equal the 1-process run's at every
  step, for every parameter: ``Shard(0)``, ``Shard(1)``, ``(_StridedShard, Shard)``, ``(Shard(0),
  Shard(1))``, replicated and plain tensors, and the Llama's embedding, a ``Shard(0)`` weight
  whose gradient is ``Replicate``.
- The negative control masks every local tensor as one contiguous run at its first element's
  index: the ``Shard(1)`` weights' zero sets then differ.
- Parameters agree with the 1-process run within the float noise that the same layout shows
  without DropGrad (the order of the sums differs across processes).
- Full update drop (AdamW): the frozen elements of each step are the 1-process run's.
- Resume: AdamW for 2 steps, then the model rebuilt and sharded again from the full parameters
  and a new DropGrad loading the state dict: the parameters after step 3 equal the
  uninterrupted run's bit for bit.
- The rate table and the rates of each step are the 1-process run's.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")

from tests.sharded_helpers import ROOT, Runs, launch

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "tests" / "distributed_scripts" / "tp_train.py"
MODES = ["", "-contiguous", "-control", "-fud", "-adamw", "-resume"]
TWO = [f"tp{m}" for m in MODES] + ["hf-tp", "hf-tp-contiguous", "hf-tp-control", "hf-tp-fud"]
FOUR = [f"fsdp-tp{m}" for m in MODES] + ["hsdp-tp"]
ONE = ["tp", "tp-control", "tp-fud", "tp-adamw", "hf-tp", "hf-tp-control", "hf-tp-fud"]
LAYOUTS = ["tp", "fsdp-tp", "hsdp-tp", "hf-tp"]


def _torchrun(processes: int, out, runs: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", "{port}", str(SCRIPT), str(out), *runs,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Runs]:
    out = {n: tmp_path_factory.mktemp(f"tp_{n}") for n in ("one", "two", "four")}
    launch([sys.executable, str(SCRIPT), str(out["one"]), *ONE])
    launch(_torchrun(2, out["two"], TWO), timeout=900)
    launch(_torchrun(4, out["four"], FOUR), timeout=900)
    return {n: Runs(path) for n, path in out.items()}


def _load(runs: dict[str, Runs], run: str) -> dict:
    where = "four" if run.startswith(("fsdp", "hsdp")) else "two"
    return torch.load(runs[where].out / f"{run}.pt", weights_only=False)


def _single(runs: dict[str, Runs], run: str) -> dict:
    """The 1-process run a layout's run is compared with (the models whole)."""
    name = run.replace("fsdp-", "").replace("hsdp-", "").replace("-contiguous", "")
    return torch.load(runs["one"].out / f"{name}.pt", weights_only=False)


def _zero_mismatches(got: dict, want: dict) -> list[tuple[int, str]]:
    return [
        (step, name)
        for step in range(len(want["grads"]))
        for name, grad in want["grads"][step].items()
        if not torch.equal(got["grads"][step][name] == 0, grad == 0)
    ]


def test_the_runs_are_really_sharded(runs) -> None:
    tp, fsdp_tp, hsdp_tp, hf = (_load(runs, r) for r in ("tp", "fsdp-tp", "hsdp-tp", "hf-tp"))
    assert (tp["world"], fsdp_tp["world"], hsdp_tp["world"], hf["world"]) == (2, 4, 4, 2)
    assert tp["placements"]["up.weight"] == "(Shard(dim=0),)"
    assert tp["placements"]["down.weight"] == "(Shard(dim=1),)"
    assert tp["local_shapes"]["up.weight"] == (11, 12)  # 21 rows: 11 + 10
    assert tp["local_shapes"]["down.weight"] == (10, 11)  # 21 columns: 11 + 10
    assert tp["placements"]["norm.weight"] == "None"  # a plain tensor on every rank
    assert fsdp_tp["placements"]["up.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert fsdp_tp["placements"]["down.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert hsdp_tp["placements"]["up.weight"].startswith("(Replicate(), _StridedShard(dim=0")
    assert hf["placements"]["model.layers.0.self_attn.o_proj.weight"] == "(Shard(dim=1),)"
    assert hf["placements"]["model.embed_tokens.weight"] == "(Shard(dim=0),)"
    assert hf["grad_placements"]["model.embed_tokens.weight"] == "(Replicate(),)"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dropped_elements_equal_the_one_process_run_at_every_step(runs, layout: str) -> None:
    got, want = _load(runs, layout), _single(runs, layout)
    assert _zero_mismatches(got, want) == []
    dropped = sum(int((g == 0).sum()) for step in want["grads"] for g in step.values())
    assert dropped > 100  # the comparison is about something


@pytest.mark.parametrize("layout", ["tp", "fsdp-tp", "hf-tp"])
def test_the_negative_control_fails_on_the_column_shards(runs, layout: str) -> None:
    bad = _zero_mismatches(_load(runs, f"{layout}-contiguous"), _single(runs, layout))
    assert bad, "masking every local tensor as contiguous should have been wrong"
    assert all(("down" in name or "o_proj" in name) for _, name in bad), bad


@pytest.mark.parametrize("layout", ["tp", "fsdp-tp", "hf-tp"])
def test_parameters_agree_within_the_layouts_own_float_noise(runs, layout: str) -> None:
    def gap(run: str) -> float:
        got, want = _load(runs, run), _single(runs, run)
        return max((got["params"][-1][n] - want["params"][-1][n]).abs().max().item()
                   for n in want["params"][-1])

    noise = gap(f"{layout}-control")
    assert gap(layout) <= 4 * noise + 1e-6, (gap(layout), noise)


@pytest.mark.parametrize("layout", ["tp", "fsdp-tp", "hf-tp"])
def test_full_update_drop_freezes_the_one_process_runs_elements(runs, layout: str) -> None:
    got, want = _load(runs, f"{layout}-fud"), _single(runs, f"{layout}-fud")
    frozen_total = 0
    for step in range(1, len(want["params"])):
        for name, value in want["params"][step].items():
            frozen = value == want["params"][step - 1][name]
            frozen_total += int(frozen.sum())
            assert torch.equal(got["params"][step][name] == got["params"][step - 1][name],
                               frozen), (step, name)
    assert frozen_total > 100


@pytest.mark.parametrize("layout", ["tp", "fsdp-tp"])
def test_resume_is_bit_identical_to_the_uninterrupted_run(runs, layout: str) -> None:
    resumed, straight = _load(runs, f"{layout}-resume"), _load(runs, f"{layout}-adamw")
    for name, value in straight["params"][-1].items():
        assert torch.equal(resumed["params"][-1][name], value), name
    assert resumed["rates"] == straight["rates"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_rate_table_and_the_rates_are_the_one_process_runs(runs, layout: str) -> None:
    got, want = _load(runs, layout), _single(runs, layout)
    assert got["table"] == want["table"]
    assert got["rates"] == want["rates"] and len(want["rates"]) == 3
    assert want["rates"][0] != want["rates"][-1]  # the schedule moved

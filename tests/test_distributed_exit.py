"""A clean exit for every multi-process run (docs/design.md, "A clean exit").

The examples and the test launchers end with ``destroy_process_groups()``
(hf_dropgrad/integrations/gloo_exit.py). What is checked:

- The race that made 2-process gloo runs abort or hang at exit after training succeeded, forced
  to happen every time (tests/distributed_scripts/exit_race.py): a gloo worker thread still
  freeing a gather's Python-created tensor (which takes the GIL) when the teardown starts. With
  ``destroy_process_groups()`` both ranks exit 0. The negative controls show that the forced
  ordering breaks the teardowns used before: none at all (the Trainer's; the group is freed
  while Python shuts down: an abort), and ``destroy_process_group()`` followed by the model
  (its DDP reducer frees the group with the GIL held: a deadlock).
- ``destroy_process_groups()`` on a 1-process gloo group in this process: afterwards no group is
  initialized and gloo's worker threads are gone, at once when nothing else holds the group,
  and without a hang when a DDP model still held it and is freed later (with the GIL held).
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo  # before any group exists: DDP imports it, and its imports bind
import torch.distributed as dist  # `group.WORLD` as default arguments (that would hold a group)

from hf_dropgrad.integrations.gloo_exit import destroy_process_groups, gloo_worker_threads
from tests.test_distributed import free_port, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_scripts" / "exit_race.py"

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
LINUX = sys.platform == "linux"  # where /proc shows gloo's threads


def exit_race(mode: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Both ranks of exit_race.py with teardown ``mode``: (rank 0, rank 1)."""
    port = str(free_port())

    def command(rank: int) -> list[str]:
        return [sys.executable, str(SCRIPT), port, str(rank), mode]

    env = subprocess_env()
    with subprocess.Popen(
        command(1), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as other:
        first = subprocess.run(
            command(0), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        out, err = other.communicate(timeout=300)
    return first, subprocess.CompletedProcess(command(1), other.returncode, out, err)


def report(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_both_ranks_exit_0_when_the_exit_race_is_forced() -> None:
    rank0, rank1 = exit_race("helper")
    assert "forced" in rank0.stdout, report(rank0)
    assert rank0.returncode == 0, report(rank0)
    assert rank1.returncode == 0, report(rank1)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "destroy"])
def test_the_forced_exit_race_breaks_the_teardowns_used_before(mode: str) -> None:
    """Negative control: the same run without ``destroy_process_groups()`` aborts or hangs
    (a hang is ended by faulthandler after 10 s, exit code 1), so the test above can fail."""
    rank0, _ = exit_race(mode)
    assert "forced" in rank0.stdout, report(rank0)
    assert rank0.returncode not in (0, 3), report(rank0)
    if mode == "destroy":  # the deadlock: the main thread waits for the group's worker
        assert "Timeout" in rank0.stderr, report(rank0)


@pytest.fixture
def gloo_group():
    """A 1-process gloo group in this process, destroyed afterwards whatever happens; yields
    the number of gloo worker threads before it."""
    threads = gloo_worker_threads()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield threads
    if dist.is_initialized():
        dist.destroy_process_group()


def train_step(model: torch.nn.Module) -> None:
    model(torch.randn(3, 4)).sum().backward()  # DDP's all-reduce starts gloo's worker threads


def test_the_group_and_its_workers_are_gone_when_nothing_else_holds_it(gloo_group: int) -> None:
    train_step(torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2)))
    if LINUX:
        assert gloo_worker_threads() > gloo_group
    destroy_process_groups()
    assert not dist.is_initialized()
    assert gloo_worker_threads() == gloo_group


def test_a_model_that_still_holds_the_group_frees_it_later_without_a_hang(
    gloo_group: int,
) -> None:
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    train_step(model)
    destroy_process_groups()
    assert not dist.is_initialized()
    if LINUX:  # the reducer still holds the group: its workers are still there, idle
        assert gloo_worker_threads() > gloo_group
    del model  # the reducer frees the group with the GIL held: the join finds idle workers
    gc.collect()
    assert gloo_worker_threads() == gloo_group


def test_nothing_to_do_without_a_process_group() -> None:
    assert not dist.is_initialized()
    destroy_process_groups()
    assert not dist.is_initialized()

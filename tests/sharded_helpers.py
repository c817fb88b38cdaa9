"""Launching the sharded-engine runs and reading what they wrote (tests/test_fsdp2.py,
tests/test_deepspeed.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hf_dropgrad import functional as F

ROOT = Path(__file__).resolve().parents[1]
TRAINER_SCRIPT = ROOT / "tests" / "distributed_scripts" / "sharded_trainer.py"
# linear schedule 0.2 -> 0.05 over 4 steps: each module's rate times r(k) / r(0)
FACTORS = [1.0, 0.8125, 0.625, 0.4375]
SEED = 7


def torchrun(script: Path, out: Path, *runs: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", "{port}", str(script), str(out), *runs,
    ]


def launch(cmd: list[str], timeout: int = 600, **env_vars: str) -> None:
    """Run ``cmd`` (``{port}`` replaced by a free port); fail with its output if it fails."""
    from tests.test_distributed import run

    run(cmd, timeout, **env_vars)


class Runs:
    def __init__(self, out: Path) -> None:
        self.out = out

    def __call__(self, name: str, rank: int = 0) -> dict:
        return torch.load(self.out / f"{name}.rank{rank}.pt", weights_only=False)


def unchanged(run: dict, step: int) -> dict[str, torch.Tensor]:
    """Per parameter, where its value did not change at ``step``."""
    before = run["initial"] if step == 0 else run["params"][step - 1]
    return {n: run["params"][step][n] == before[n] for n in before}


def oracle_dropped(run: dict, step: int) -> dict[str, torch.Tensor]:
    """The full-parameter masks of a step, drawn by the reference for each parameter."""
    out = {}
    # every parameter has a rate; the dict is in position order
    rates = next(m for m in run["maskings"] if m["step"] == step)["per_parameter"]
    for index, name in enumerate(rates):
        shape = run["initial"][name].shape
        threshold = F.drop_threshold(rates[name])
        keep = F.keep_mask_reference(shape.numel(), F.derive_key(SEED, step, index), threshold)
        out[name] = ~keep.view(shape)
    return out

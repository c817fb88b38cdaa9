"""FSDP2 (``fully_shard``) runs launched by ``tests/test_fsdp2.py``, in 1 or 2 processes.

    torchrun --nproc_per_node 2 tests/distributed_scripts/fsdp2_train.py OUT RUN [RUN ...]
    python tests/distributed_scripts/fsdp2_train.py OUT RUN [RUN ...]     # 1 process, no FSDP

Every run trains a tiny T5 (built from a config, dropout off) for 4 optimizer steps on the
same global batches: 8 sequences of one length per step, so each of 2 processes takes 4 of
them and the mean of the two processes' mean losses is the 1-process mean loss. DropGrad
runs with ``{"encoder": 0.1, "decoder": 0.3}`` (0.2 for the rest) scaled by a linear schedule
0.2 -> 0.05. With 2 processes the model is ``fully_shard``-ed (each T5 block, then the root) on
``init_device_mesh("cpu", (2,))``: parameters and gradients are ``Shard(0)`` ``DTensor``s. The
vocabulary has 63 tokens, so ``shared.weight`` (63 x 16, tied to the LM head) splits into 32
rows on rank 0 and a shorter last shard of 31 rows on rank 1.

A RUN is one of:

- ``sgd``: SGD without momentum, so an element's update is zero exactly where its gradient is
  zero after masking: the recorded zero-update pattern of each step is the set of dropped
  elements (plus elements whose gradient was zero anyway, recorded in 1 process).
- ``sgd-nooffset``: the same, but every shard is masked as if it started at element 0 (the
  bug the offsets prevent); the negative control.
- ``adamw-fud``: AdamW with full update drop: the frozen elements of each step are the dropped
  ones, whatever momentum does.
- ``sgd-resume``: 2 steps, then everything is rebuilt from a checkpoint of the full parameters
  and ``DropGrad.state_dict()``, and 2 more steps.

Each process writes ``OUT/<RUN>.rank<r>.pt``: per step the full parameters after the step (the
``DTensor``s gathered with ``full_tensor()``), in 1 process also the positions whose gradient
was zero before masking, and the DropGrad step and rates of every masking.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hf_dropgrad import DropGrad, LinearDropRateScheduler, destroy_process_groups

MAX_STEPS = 4
GLOBAL_BATCH = 8
LENGTH = 8
RATE, FINAL_RATE = 0.2, 0.05
MODULE_RATES = {"encoder": 0.1, "decoder": 0.3}
SEED = 7


def tiny_t5() -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=63, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(cfg)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, 60, (GLOBAL_BATCH, LENGTH), generator=g)
    return ids, ids.flip(1)


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = global_batch(step)
    share = GLOBAL_BATCH // world
    return ids[rank * share : (rank + 1) * share], labels[rank * share : (rank + 1) * share]


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for stack in (model.encoder, model.decoder):
        for block in stack.block:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def build(
    kind: str, sharded: bool, weights: dict | None = None, seed: int = SEED,
    log: list[dict] | None = None,
) -> tuple[torch.nn.Module, DropGrad, list[dict]]:
    model = tiny_t5()
    if weights is not None:
        model.load_state_dict(weights, strict=False)  # tied aliases are not listed
    if sharded:
        shard(model)
    if kind == "adamw":
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=0.5)
    dropgrad = DropGrad(
        inner, drop_rate=RATE, params=MODULE_RATES, model=model, seed=seed,
        drop_rate_scheduler=LinearDropRateScheduler(RATE, FINAL_RATE, MAX_STEPS),
        full_update_drop=kind == "adamw",
    )
    log = [] if log is None else log
    dropgrad.optimizer.register_step_pre_hook(
        lambda *_: log.append({
            "step": dropgrad.step_count, "rates": dropgrad.rate_groups(),
            "per_parameter": dropgrad.current_rates(),
        })
    )
    return model, dropgrad, log


def train(
    model: torch.nn.Module, dropgrad: DropGrad, steps: range, rank: int, world: int,
    record: dict,
) -> None:
    names = [n for n, _ in model.named_parameters()]
    for step in steps:
        ids, labels = local_batch(step, rank, world)
        model(input_ids=ids, labels=labels).loss.backward()
        if world == 1:  # positions whose gradient is zero before any mask
            record["zero_grads"].append(
                {n: (p.grad == 0).clone() for n, p in model.named_parameters()}
            )
        dropgrad.step()
        dropgrad.zero_grad()
        record["params"].append({n: full(p) for n, p in zip(names, model.parameters())})


def run(name: str, rank: int, world: int) -> dict:
    from hf_dropgrad.integrations import dtensor
    from hf_dropgrad.layout import Box

    kind, *variant = name.split("-")
    sharded = world > 1
    boxes_of = dtensor.boxes_of
    if "nooffset" in variant:  # the bug the offsets prevent: every shard at element 0
        dtensor.boxes_of = lambda local, *args: (Box(local),) if local.numel() else ()
    try:
        return train_run(kind, variant, sharded, rank, world)
    finally:
        dtensor.boxes_of = boxes_of


def train_run(kind: str, variant: list[str], sharded: bool, rank: int, world: int) -> dict:
    model, dropgrad, log = build(kind, sharded)
    record: dict = {"params": [], "zero_grads": [], "maskings": log}
    record["initial"] = {n: full(p) for n, p in model.named_parameters()}
    record["placements"] = {
        n: str(getattr(p, "placements", None)) for n, p in model.named_parameters()
    }
    record["local_numels"] = {
        n: getattr(p, "_local_tensor", p).numel() for n, p in model.named_parameters()
    }
    if "resume" in variant:
        train(model, dropgrad, range(2), rank, world, record)
        weights = {n: full(p) for n, p in model.named_parameters()}
        own = dropgrad.state_dict()["dropgrad"]  # SGD without momentum has no other state
        del model, dropgrad
        # a fresh process would start here; another seed, which the checkpoint's must replace
        model, dropgrad, _ = build(kind, sharded, weights, seed=123, log=log)
        state = dropgrad.state_dict()
        state["dropgrad"] = own
        dropgrad.load_state_dict(state)
        train(model, dropgrad, range(2, MAX_STEPS), rank, world, record)
    else:
        train(model, dropgrad, range(MAX_STEPS), rank, world, record)
    record["step_count"] = dropgrad.step_count
    record["names"] = dict(enumerate(n for n, _ in model.named_parameters()))
    record["world_size"] = world
    return record


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    for name in sys.argv[2:]:
        torch.save(run(name, rank, world), out / f"{name}.rank{rank}.pt")
        print(f"[rank {rank}] {name} done", flush=True)


if __name__ == "__main__":
    main()
    destroy_process_groups()  # a clean exit (docs/design.md)

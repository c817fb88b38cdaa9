"""Tensor-parallel and 2-D (FSDP2 over TP) runs launched by ``tests/test_tensor_parallel.py``.

    torchrun --nproc_per_node N tests/distributed_scripts/tp_train.py OUT RUN [RUN ...]
    python tests/distributed_scripts/tp_train.py OUT RUN [RUN ...]     # 1 process: no sharding

Every run trains the same small model for 3 optimizer steps on the same global batches: an
``up`` projection (``Linear(12, 21)``: 21 rows, an uneven split in two), a ``GELU``, a ``down``
projection (``Linear(21, 10)``: 21 columns, uneven), a ``LayerNorm`` and a ``head``
(``Linear(10, 5)``). DropGrad runs with ``{"up": 0.3, "down": 0.2}`` (0.1 for the rest) scaled
by a linear schedule 0.1 -> 0.05, on SGD without momentum, so the masked gradient stays in
``.grad``. No activation gives exact zeros: the zeros of a masked gradient are its dropped
elements.

Layouts (``WORLD`` processes, gloo, CPU):

- ``tp`` (2): ``parallelize_module`` with ``up`` ``ColwiseParallel`` (weight and bias
  ``Shard(0)``: 11 and 10 rows) and ``down`` ``RowwiseParallel`` (weight ``Shard(1)``: 11 and
  10 columns, bias ``Replicate``); ``norm`` and ``head`` stay plain tensors on both ranks.
- ``fsdp-tp`` (4): the same plan on the ``tp`` dimension of a ``(2, 2)`` mesh, then
  ``fully_shard`` on its ``dp`` dimension: ``up.weight`` is ``(_StridedShard(0, sf=2),
  Shard(0))``, ``down.weight`` ``(Shard(0), Shard(1))``; each ``dp`` rank takes half the batch.
- ``hsdp-tp`` (4): ``fully_shard`` on a ``(replicate, shard)`` pair of a ``(1, 2, 2)`` mesh
  over the same TP plan: ``(Replicate(), _StridedShard(0, sf=2), Shard(0))`` and the like.
- ``hf-tp`` (2): a tiny Llama (transformers) sharded by its own ``tp_plan`` (``auto``), trained
  in a plain loop (Accelerate refuses TP on ``MULTI_CPU``); in 1 process, the same model whole.

A RUN is ``<layout>`` (SGD, as above), ``<layout>-contiguous`` (the negative control: every
local tensor masked as one contiguous run, as before tensor parallel was supported), ``<layout>-
control`` (no DropGrad: the float noise of the layout), ``<layout>-fud`` (AdamW with full update
drop: the frozen elements are the dropped ones), ``<layout>-adamw`` (AdamW) or ``<layout>-resume``
(AdamW, 2 steps, then the model rebuilt and sharded again from the full parameters, a new
DropGrad with another seed loading the state dict, and 1 more step: the ``adamw`` run's
parameters, bit for bit). In 1 process the layout is ignored: the same model,
whole. Rank 0 writes ``OUT/<RUN>.pt``: per step the full gradient after the step (``grads``,
gathered with ``full_tensor()``), the full parameters (``params``), and DropGrad's rate table
(``rates``, ``table``) and the placements of every parameter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hf_dropgrad import DropGrad, LinearDropRateScheduler, destroy_process_groups

STEPS = 3
BATCH = 8
SEED = 11
MODULE_RATES = {"up": 0.3, "down": 0.2}
HF_RATES = {"mlp": 0.3, "self_attn": 0.2, "embed_tokens": 0.1, "lm_head": 0.15}


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(12, 21)
        self.act = torch.nn.GELU()
        self.down = torch.nn.Linear(21, 10)
        self.norm = torch.nn.LayerNorm(10)
        self.head = torch.nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.down(self.act(self.up(x)))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_plan() -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # The colwise output stays a DTensor (its global shape known), so the uneven split (21 =
    # 11 + 10) reaches the rowwise layer intact; from_local would assume even shards.
    return {"up": ColwiseParallel(use_local_output=False), "down": RowwiseParallel()}


def build(layout: str, state: dict | None = None) -> tuple[torch.nn.Module, int, int]:
    """The model (its parameters ``state`` when given), sharded as ``layout`` says (whole in 1
    process); and this rank's data-parallel (index, size)."""
    model = Mlp()
    if state is not None:
        model.load_state_dict(state)
    if world() == 1:
        return model, 0, 1
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    if layout == "tp":
        mesh = init_device_mesh("cpu", (world(),), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, tp_plan())
        return model, 0, 1
    if layout == "fsdp-tp":
        mesh = init_device_mesh("cpu", (2, world() // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], tp_plan())
        fully_shard(model, mesh=mesh["dp"])
        return model, mesh["dp"].get_local_rank(), 2
    if layout == "hsdp-tp":
        mesh = init_device_mesh("cpu", (1, 2, world() // 2),
                                mesh_dim_names=("replicate", "shard", "tp"))
        parallelize_module(model, mesh["tp"], tp_plan())
        fully_shard(model, mesh=mesh["replicate", "shard"])
        return model, mesh["shard"].get_local_rank(), 2
    raise ValueError(layout)


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return (t.full_tensor() if type(t).__name__ == "DTensor" else t).detach()


def force_contiguous(on: bool) -> None:
    """The negative control (``on``): every local tensor masked as one run at its first
    element's index (what DropGrad did before it read placements beyond Shard(0))."""
    from hf_dropgrad.integrations import dtensor
    from hf_dropgrad.layout import Box

    real = getattr(dtensor.boxes_of, "real", dtensor.boxes_of)

    def contiguous(local, shape, mesh, placements, what):  # type: ignore[no-untyped-def]
        boxes = real(local, shape, mesh, placements, what)
        return (Box(local, boxes[0].offset),) if boxes else boxes

    contiguous.real = real  # type: ignore[attr-defined]
    dtensor.boxes_of = contiguous if on else real


def llama(path: Path) -> tuple[torch.nn.Module, int, int]:
    """A tiny Llama saved by rank 0, loaded with its tp_plan (whole in 1 process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if rank() == 0 and not (path / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=36,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=32, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()
    if world() == 1:
        return LlamaForCausalLM.from_pretrained(path), 0, 1
    return LlamaForCausalLM.from_pretrained(path, tp_plan="auto"), 0, 1


def hf_batch(step: int) -> torch.Tensor:
    return torch.randint(3, 60, (4, 12), generator=torch.Generator().manual_seed(200 + step))


def train(out: Path, run: str) -> None:
    parts = run.split("-")
    mode = parts[-1] if parts[-1] in ("contiguous", "control", "fud", "adamw", "resume") else "sgd"
    layout = "-".join(parts[:-1]) if mode != "sgd" else run
    force_contiguous(mode == "contiguous")
    hf = layout == "hf-tp"
    model, dp_rank, dp_size = llama(out / "llama") if hf else build(layout)

    def make(model: torch.nn.Module, seed: int) -> torch.optim.Optimizer:
        adam = mode in ("fud", "adamw", "resume")
        inner = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1) if adam
                 else torch.optim.SGD(model.parameters(), lr=0.1))
        if mode == "control":
            return inner
        sched = LinearDropRateScheduler(0.1, 0.05, STEPS)
        rates = HF_RATES if hf else MODULE_RATES
        return DropGrad(inner, params=rates, model=model, drop_rate_scheduler=sched, seed=seed,
                        full_update_drop=mode == "fud")

    optimizer = make(model, SEED)
    record = {"grads": [], "params": [], "rates": [], "table": None, "world": world(),
              "placements": {n: str(getattr(p, "placements", None))
                             for n, p in model.named_parameters()},
              "local_shapes": {n: tuple(getattr(p, "_local_tensor", p).shape)
                               for n, p in model.named_parameters()}}
    if isinstance(optimizer, DropGrad):
        record["table"] = optimizer.describe()
    for step in range(STEPS):
        if mode == "resume" and step == 2:  # rebuild everything from the full state
            state = {n: full(p).clone() for n, p in model.named_parameters()}
            saved = optimizer.state_dict()
            model, dp_rank, dp_size = build(layout, state)
            optimizer = make(model, SEED + 1000)  # the state dict's seed must win
            optimizer.load_state_dict(saved)
        if isinstance(optimizer, DropGrad):
            record["rates"].append(optimizer.current_rates())
        if hf:
            ids = hf_batch(step)
            loss = model(input_ids=ids, labels=ids).loss
        else:
            x, y = batch(step)
            mine = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
            x, y = x[mine], y[mine]
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step == 0:
            record["grad_placements"] = {n: str(getattr(p.grad, "placements", None))
                                         for n, p in model.named_parameters()}
        optimizer.step()
        record["grads"].append({n: full(p.grad) for n, p in model.named_parameters()})
        record["params"].append({n: full(p).clone() for n, p in model.named_parameters()})
        optimizer.zero_grad()
    if rank() == 0:
        torch.save(record, out / f"{run}.pt")


def main() -> int:
    out = Path(sys.argv[1])
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")
    for run in sys.argv[2:]:
        train(out, run)
    return 0


if __name__ == "__main__":
    code = main()
    destroy_process_groups()  # a clean exit (docs/design.md); not on an error path
    sys.exit(code)

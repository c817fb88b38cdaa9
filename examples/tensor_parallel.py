"""DropGrad under tensor parallel (and FSDP2 over tensor parallel), in a plain torch loop.

Shards a small MLP with ``parallelize_module`` (``up`` column-wise: its weight ``Shard(0)``;
``down`` row-wise: its weight ``Shard(1)``), optionally with ``fully_shard`` over a data-parallel
mesh dimension on top, and trains it with ``DropGrad`` on data made in code (offline, seconds on
a CPU). DropGrad needs nothing from you: each process masks its local tensors with the mask of
their elements' indices in the full parameters, so the masks are those of a 1-process run
whatever the layout (docs/design.md, "Sharded engines"). At the end the script gathers each
masked gradient and checks it against the reference mask of the full parameter.

    python examples/tensor_parallel.py                       # 1 process: the model whole
    torchrun --nproc_per_node 2 examples/tensor_parallel.py  # tensor parallel over 2
    torchrun --nproc_per_node 4 examples/tensor_parallel.py --dp 2   # FSDP2 (2) x TP (2)
    accelerate launch --multi_gpu --num_processes 2 examples/tensor_parallel.py

On a CPU-only machine the processes talk over gloo; with GPUs, over NCCL.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from hf_dropgrad import DropGrad, destroy_process_groups
from hf_dropgrad import functional as F


class Mlp(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(32, width)
        self.down = torch.nn.Linear(width, 32)
        self.head = torch.nn.Linear(32, 4)  # not in the plan: a plain tensor on every rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.down(torch.nn.functional.gelu(
            self.up(x)))))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=1,
                        help="data-parallel (FSDP2) size; the rest of the processes is TP")
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--drop_rate", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def shard(model: Mlp, dp: int) -> tuple[int, int]:
    """Shard ``model`` over every process; returns this process's data-parallel (rank, size)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    world = dist.get_world_size()
    if world % dp:
        raise SystemExit(f"--dp {dp} must divide the {world} processes")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dp, world // dp), mesh_dim_names=("dp", "tp"))
    plan = {"up": ColwiseParallel(use_local_output=False), "down": RowwiseParallel()}
    parallelize_module(model, mesh["tp"], plan)
    if dp > 1:
        fully_shard(model, mesh=mesh["dp"])  # FSDP2 over TP: a 2-D layout
    return mesh["dp"].get_local_rank(), dp


def main() -> None:
    args = parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(0)
    model = Mlp(args.width)
    dp_rank, dp_size = shard(model, args.dp) if distributed else (0, 1)
    device = "cuda" if distributed and torch.cuda.is_available() else "cpu"
    model.to(device)
    optimizer = DropGrad(torch.optim.SGD(model.parameters(), lr=0.05), drop_rate=args.drop_rate,
                         seed=args.seed, model=model)
    names = [n for n, _ in model.named_parameters()]
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
        mine = slice(dp_rank * 16 // dp_size, (dp_rank + 1) * 16 // dp_size)
        loss = torch.nn.functional.cross_entropy(model(x[mine].to(device)), y[mine].to(device))
        loss.backward()
        optimizer.step()  # SGD: the masked gradient stays in .grad
        checked = check(model, names, args, step)
        optimizer.zero_grad()
        if not distributed or dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}, masks exact on {checked} parameters")
    if not distributed or dist.get_rank() == 0:
        placements = {n: str(getattr(p, "placements", "plain")) for n, p in
                      model.named_parameters()}
        print("placements:", placements)


def check(model: torch.nn.Module, names: list[str], args: argparse.Namespace, step: int) -> int:
    """Gather every masked gradient whole and compare its zeros with the reference mask of the
    full parameter (no activation gives exact zeros here)."""
    threshold = F.drop_threshold(args.drop_rate)
    for index, (name, p) in enumerate(model.named_parameters()):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        keep = F.keep_mask_reference(grad.numel(), F.derive_key(args.seed, step, index),
                                     threshold, grad.device).view(grad.shape)
        if not torch.equal(grad == 0, ~keep):
            raise SystemExit(f"step {step}: the mask of {name} is not the 1-process mask")
    return len(names)


if __name__ == "__main__":
    main()
    destroy_process_groups()  # under torchrun: a clean exit (docs/design.md)

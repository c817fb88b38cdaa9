"""DropGrad on ``DTensor`` parameters in one gloo process: what it masks and what it refuses.

    python tests/distributed_scripts/fsdp2_dtensor.py PORT

One process is enough to make ``fully_shard`` turn parameters and gradients into ``DTensor``s
and to build other placements with ``distribute_tensor`` (the layouts of several processes are
checked by tests/test_tensor_parallel.py). Prints one line per case:

- ``FSDP2 MASKED <n>``: a ``fully_shard``-ed model's ``Shard(0)`` gradients are masked as the
  full parameters' (``n`` dropped elements, equal to the reference mask's count);
- ``HSDP MASKED <placements>``: the same with a replica dimension (``Replicate``, ``Shard(0)``);
- ``TP MASKED Shard(1)``: a parameter sharded on dimension 1 (tensor parallel) is masked as
  the full parameter;
- ``PARTIAL MASKED``: a ``Partial`` (not yet reduced) gradient of a ``Shard(0)`` parameter is
  masked as the full gradient.

(Placements DropGrad does not know are refused, naming the parameter, only when it has a rate:
tests/test_integrations_dtensor.py.)

Exits non-zero on any other outcome. Run it in a subprocess: a crash must not take the test
runner down.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

from hf_dropgrad import DropGrad, destroy_process_groups
from hf_dropgrad import functional as F


def main() -> int:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3))
        fully_shard(model, mesh=mesh)
        optimizer = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=1)
        model(torch.randn(4, 8)).sum().backward()
        grad = model[0].weight.grad
        assert type(grad).__name__ == "DTensor", type(grad)
        before = grad.full_tensor().clone()
        optimizer.step()  # SGD without momentum: the masked gradient is still in .grad
        t = F.drop_threshold(0.5)
        want = before.clone()
        F.mask_reference_(want, F.derive_key(1, 0, 0), t, F.keep_scale(t))
        assert torch.equal(grad.full_tensor(), want)
        print(f"FSDP2 MASKED {int((want == 0).sum())}", flush=True)

        # HSDP: a replica dimension (Replicate) around the shard dimension is exact too
        torch.manual_seed(0)
        hsdp = torch.nn.Linear(8, 16)
        mesh2 = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
        fully_shard(hsdp, mesh=mesh2)
        hsdp_opt = DropGrad(torch.optim.SGD(hsdp.parameters(), lr=0.1), drop_rate=0.5, seed=1)
        hsdp(torch.randn(4, 8)).sum().backward()
        before = hsdp.weight.grad.full_tensor().clone()
        hsdp_opt.step()
        want = before.clone()
        F.mask_reference_(want, F.derive_key(1, 0, 0), t, F.keep_scale(t))
        assert torch.equal(hsdp.weight.grad.full_tensor(), want)
        print(f"HSDP MASKED {hsdp.weight.placements}", flush=True)

        ok = True
        want = torch.ones(4, 6)
        F.mask_reference_(want, F.derive_key(1, 0, 0), t, F.keep_scale(t))
        w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
        w.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
        DropGrad(torch.optim.SGD([w], lr=0.1), drop_rate=0.5, seed=1).step()
        if torch.equal(w.grad.full_tensor(), want):
            print("TP MASKED Shard(1)", flush=True)
        else:
            ok = False

        v = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)]))
        v.grad = DTensor.from_local(torch.ones(4, 6), mesh, [Partial()])
        DropGrad(torch.optim.SGD([v], lr=0.1), drop_rate=0.5, seed=1).step()
        if torch.equal(v.grad.full_tensor(), want):
            print("PARTIAL MASKED", flush=True)
        else:
            ok = False

        return 0 if ok else 1
    finally:
        destroy_process_groups()  # a clean exit (docs/design.md); 1 process: no one to wait for


if __name__ == "__main__":
    sys.exit(main())

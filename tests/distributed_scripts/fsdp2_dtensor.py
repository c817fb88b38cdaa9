"""DropGrad on FSDP2-sharded parameters (``DTensor`` gradients), in a plain torch loop.

    python tests/distributed_scripts/fsdp2_dtensor.py PORT

One gloo process is enough to make ``fully_shard`` turn parameters and gradients into
``DTensor``s. DropGrad cannot mask sharded gradients consistently with a 1-process run, so
``step()`` must refuse them with an error that says so. Prints ``REFUSED: <message>`` and
exits 0 when it does; any other outcome (silent masking, an unrelated error, a crash) exits
non-zero or never prints that line. Run it in a subprocess: a crash must not take the test
runner down.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from hf_dropgrad import DropGrad


def main() -> int:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3))
        fully_shard(model)
        optimizer = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, seed=1)
        model(torch.randn(4, 8)).sum().backward()
        print("gradient type:", type(model[0].weight.grad).__name__, flush=True)
        try:
            optimizer.step()
        except (RuntimeError, ValueError, TypeError) as exc:
            message = str(exc)
            if "DropGrad" in message and ("FSDP" in message or "DTensor" in message):
                print(f"REFUSED: {message}", flush=True)
                return 0
            print(f"unclear error: {type(exc).__name__}: {message}", flush=True)
            return 1
        print("DropGrad masked sharded gradients silently", flush=True)
        return 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

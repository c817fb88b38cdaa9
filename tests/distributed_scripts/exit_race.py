"""The exit race of 2-process gloo runs, forced every time (tests/test_distributed_exit.py).

    python tests/distributed_scripts/exit_race.py PORT RANK MODE    # ranks 0 and 1, 2 processes

Each rank wraps a tiny model in ``DistributedDataParallel`` (its C++ reducer then holds the
process group), takes a step and gathers a tensor, as ``accelerator.gather`` does. Rank 0 lets
go of the gather while it still waits for rank 1, so that the gloo worker thread that runs it
ends up holding the last reference to the gathered tensor, which Python created. Freeing it
takes the GIL (``TensorImpl::decref_pyobject``); a finalizer on the tensor stretches that moment
(it sleeps ``HOLD_S`` seconds with the GIL released, then needs it again), and rank 0 starts
its teardown as soon as the freeing has begun: the ordering that, left to chance, made 1 run in
8 abort or hang at exit on a busy machine happens every time. (While it frees the tensor, the
worker also holds the lock that the group's destructor takes first.)

``MODE``, the teardown that follows:

- ``helper``: ``destroy_process_groups()`` (hf_dropgrad/integrations/gloo_exit.py) after ``main()``;
- ``destroy``: ``dist.destroy_process_group()``, then the model is freed as ``main()`` returns:
  its reducer drops the group's last reference with the GIL held, and the group's destructor
  waits for the worker, which waits for the GIL: a deadlock;
- ``none``: nothing (the Trainer's way): the group is freed while Python shuts down and the
  worker, asking for the GIL then, aborts the process.

``faulthandler`` ends a process still tearing down after ``HANG_S[MODE]`` seconds with exit code
1 and every thread's stack on stderr. Prints ``forced`` once the worker thread is freeing the
tensor (exit code 3 if it was freed on the main thread: then the ordering was not forced).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
import weakref

import torch
import torch._dynamo  # before the group exists, so that its imports bind no group
import torch.distributed as dist

from hf_dropgrad import destroy_process_groups

HOLD_S = 2.0
HANG_S = {"helper": 120.0, "destroy": 10.0, "none": 10.0}


def main(rank: int, mode: str) -> int:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4))
    model(torch.randn(2, 8)).sum().backward()
    value = torch.full((3,), float(rank))
    out = torch.empty(6)
    if rank == 1:
        time.sleep(1.0)  # rank 0 lets go of its gather while the gather waits for us
        dist.all_gather_single(out, value)
    else:
        work = dist.all_gather_single(out, value, async_op=True)
        freeing = threading.Event()
        on_worker: list[bool] = []

        def hold() -> None:  # runs where the tensor is freed, with the GIL
            on_worker.append(threading.current_thread() is not threading.main_thread())
            freeing.set()
            time.sleep(HOLD_S)  # the GIL released; needed again to return

        weakref.finalize(value, hold)
        del work, value  # the gather's work item (on a worker thread) holds them now
        freeing.wait()
        if not on_worker[0]:
            print("not forced: the tensor was freed on the main thread", flush=True)
            return 3
        print("forced", flush=True)
    assert out.tolist() == [0.0] * 3 + [1.0] * 3, out
    faulthandler.dump_traceback_later(HANG_S[mode], exit=True)  # the teardown from here on
    if mode == "destroy":
        dist.destroy_process_group()
    return 0  # the model goes with this frame


if __name__ == "__main__":
    port, rank, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    code = main(rank, mode)
    if mode == "helper":
        destroy_process_groups()
    print(f"rank {rank}: main returned {code}", flush=True)
    sys.exit(code)

"""A clean exit for multi-process runs on gloo (the CPU): end with ``destroy_process_groups()``.

The examples and the test launchers end this way, on every process, and so can any script
launched with ``accelerate launch`` or ``torchrun`` on gloo, with or without DropGrad::

    from hf_dropgrad import destroy_process_groups

    if __name__ == "__main__":
        main()
        destroy_process_groups()  # instead of accelerator.end_training() / destroy_process_group()

Why (docs/design.md, "A clean exit"): gloo runs each collective on a worker thread, and that
thread frees the collective's work item (with its tensors) *after* the caller's ``wait()`` has
returned. Freeing a tensor that Python created takes the GIL. A ``barrier`` makes it later still:
its work item keeps weak references to the items that were in flight, and those are only freed
with the barrier's item, by whichever thread lets go of it last. The worker threads are joined
when the process group is freed, and who frees it is not up to the script: DDP's C++ reducer
does it with the GIL held (the join then waits for a worker that waits for the GIL: a deadlock),
and torch's caches, ``deepspeed`` or default arguments bound at import (``group=group.WORLD``)
keep the group until Python shuts down (a worker that asks for the GIL then is ended inside a
C++ destructor: ``terminate called without an active exception``). A barrier or a pause only
makes either rarer.

The fix is ownership. One barrier per gloo group, whose work item this process keeps:

- every work item that finished before the barrier was enqueued has been freed by then: a worker
  frees its item under the group's queue lock, and enqueuing the barrier takes that lock with
  the GIL released, so a worker that needs the GIL to finish freeing gets it first;
- every item still in flight is waited for by the barrier and stays referenced by the barrier's
  item, so its worker only lets go of a reference, it frees nothing.

After the barrier no gloo worker frees anything again: whoever frees the group later, with the
GIL held or while Python shuts down, only joins idle threads. The groups are then destroyed
(``dist.destroy_process_group()``), and the barriers' items are freed here when the groups'
worker threads are gone; otherwise (something still holds a group) they are kept until the
process ends.

This module needs only torch (checked against torch 2.13's ``ProcessGroupGloo``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import glob
import os

import torch.distributed as dist

__all__ = ["destroy_process_groups", "gloo_worker_threads"]

# the name gloo gives its worker threads (Linux shows it in /proc/self/task/*/comm)
GLOO_WORKER_THREAD = "pt_gloo_runloop"


def destroy_process_groups() -> None:
    """End a successful multi-process run: quiesce gloo's worker threads, destroy the groups.

    Call it on every process, at the end of the run (a barrier per gloo group is part of it),
    instead of ``accelerator.end_training()`` or ``dist.destroy_process_group()``; after the
    function that trained has returned is best (its models, and their DDP reducers, are then
    gone, so the groups are usually freed right here). Does nothing when no process group is
    initialized (a 1-process run). Not for an error path: the other processes may never come to
    the barrier.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed import distributed_c10d

    groups = list(distributed_c10d._world.pg_map)
    barriers = [
        dist.barrier(group=group, async_op=True)
        for group in groups
        if dist.get_backend(group) == "gloo"
    ]
    for work in barriers:
        work.wait()
    gc.collect()  # models in reference cycles: their reducers let go of the groups now
    dist.destroy_process_group()
    # If these are the last references, each handle releases the GIL and its group joins its
    # (idle) worker threads right here.
    del groups
    if os.path.isdir("/proc/self/task") and gloo_worker_threads() == 0:
        return  # no worker thread is left: the barriers' items are freed here, on this thread
    _keep_until_exit(barriers)


def gloo_worker_threads() -> int:
    """How many gloo worker threads this process runs (0 where ``/proc`` cannot tell)."""
    count = 0
    for path in glob.glob("/proc/self/task/*/comm"):
        with contextlib.suppress(OSError), open(path) as f:
            count += f.read().strip() == GLOO_WORKER_THREAD
    return count


def _keep_until_exit(obj: object) -> None:
    """Take a reference to ``obj`` that is never given back: it is never freed, by any thread."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))

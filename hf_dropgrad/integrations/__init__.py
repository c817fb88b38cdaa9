"""What DropGrad knows about other libraries' internals, one module per engine.

* :mod:`~hf_dropgrad.integrations.fsdp`: FSDP2 ``DTensor`` shards (and FSDP1's refusal);
* :mod:`~hf_dropgrad.integrations.deepspeed`: DeepSpeed ZeRO-1/2/3 partitions;
* :mod:`~hf_dropgrad.integrations.accelerate`: which launcher setups are exact, and the step
  method Accelerate's ``AcceleratedOptimizer`` captures under fp16;
* :mod:`~hf_dropgrad.integrations.gloo_exit`: ``destroy_process_groups()``, a clean end for
  multi-process runs on gloo (torch's ``ProcessGroupGloo`` worker threads).

Each module says which version of the library it was checked against, next to the internals
it reads. The Trainer layer reaches the DeepSpeed and Accelerate ones through one entry point,
:func:`hf_dropgrad.install.install_dropgrad`, which puts DropGrad into an optimizer chain.
They hand the core what it needs through public objects only: a
:class:`~hf_dropgrad.layout.Piece` per local shard, a :class:`~hf_dropgrad.layout.FlatLayout`
given to :meth:`DropGrad.set_layout <hf_dropgrad.optimizer.DropGrad.set_layout>`. The core
(``optimizer``, ``functional``, ``schedulers``, ``patterns``, ``kernels``) imports none of
them: :mod:`~hf_dropgrad.integrations.fsdp` registers its ``DTensor`` handling with
:func:`hf_dropgrad.layout.register_sharded` when the package is imported.
"""

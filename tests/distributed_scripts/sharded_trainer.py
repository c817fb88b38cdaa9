"""DeepSpeed ZeRO and FSDP2 runs through the ``Trainer``, launched by ``tests/test_deepspeed.py``
and ``tests/test_fsdp2.py``.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 \\
        tests/distributed_scripts/sharded_trainer.py OUT RUN [RUN ...]     # 2 gloo processes
    python tests/distributed_scripts/sharded_trainer.py OUT single  # 1 process, no DeepSpeed

Every run trains a tiny T5 (built from a config, dropout off, odd sizes — 63 x 15 embedding,
15-element layer norms — so that ZeRO-3's last partitions are padded and FSDP2's last shards
shorter) for 4 optimizer steps of SGD
without momentum (``--optim sgd``, constant LR, no clipping) on the same global batches: 8
sequences of one length per step (4 per process with 2 processes), so the mean of the two
processes' mean losses is the 1-process mean loss (``average_tokens_across_devices=False``:
with the default, DeepSpeed's loss would be scaled by the world size). DropGrad runs with
``{"encoder": 0.1, "decoder": 0.3}`` (0.2 for the rest) scaled by a linear schedule
0.2 -> 0.05.

A RUN is ``zero<stage>[-<variant>]``:

- ``zero1``, ``zero2``, ``zero3``: a ``DropGradTrainer`` with a DeepSpeed config of that stage
  and "auto" fields, no ``optimizer`` block: DeepSpeed steps the ``DropGrad`` the Trainer
  built. ``zero2`` also saves a checkpoint at step 2.
- ``zero2-callback``: a plain ``Trainer`` plus ``DropGradCallback``, and an ``optimizer`` block
  in the DeepSpeed config (DeepSpeed builds its own SGD): DropGrad wraps it after DeepSpeed's
  initialisation.
- ``zero2-accelerate``: no ``deepspeed=`` argument; launched with ``accelerate launch
  --config_file examples/accelerate_configs/deepspeed_zero2.yaml``, the shipped config (and
  its ``ds_zero2.json``) choose DeepSpeed, as for a user.
- ``zero2-fud``, ``zero3-fud`` (and ``single-fud``): AdamW (``--optim adamw_torch``) with full
  update drop: the frozen elements of each step are the dropped ones, whatever Adam's momentum
  does; under ZeRO they are restored in the fp32 partitions before DeepSpeed copies them out.
- ``zero2-bf16``: ``--bf16`` (``ds_zero2.json``'s ``"bf16": "auto"`` turns DeepSpeed's bf16 on):
  the model trains in bf16 and DropGrad masks ZeRO's fp32 master gradients.
- ``zero2-resume``, ``zero3-resume``: resume from ``zero2``'s / ``zero3``'s checkpoint at
  step 2 (``zero2`` and ``zero3`` save one) and train to step 4.
- ``zero3-nooffset``: ZeRO-3 with every partition masked as if it started at element 0 (the
  bug the offsets prevent): the negative control.
- ``fsdp2`` (a launch of its own): a ``DropGradTrainer`` under FSDP2 through Accelerate
  (``fsdp_config={"version": 2}``). Accelerate never picks FSDP on a CPU-only machine (it
  silently runs DDP), so the run forces the choice (``PartialState._prepare_backend`` returns
  gloo and ``MULTI_GPU``; ``ACCELERATE_TORCH_DEVICE=cpu``), and ties T5's embeddings as
  module attributes so ``fully_shard`` shards one tensor. Accelerate then replaces the
  parameters inside the optimizer's ``param_groups`` with their ``DTensor`` shards.
- ``loop-zero2``, ``loop-zero3``: a plain DeepSpeed loop (``deepspeed.initialize`` with a
  ``DropGrad`` as its optimizer, ``hf_dropgrad.integrations.deepspeed.attach_deepspeed``);
  its optimizer holds the parameters in model order, like ``single-callback``.
- ``single`` (1 process): a ``DropGradTrainer`` without DeepSpeed, 8 sequences per step;
  ``single-callback``: a plain ``Trainer`` with ``DropGradCallback`` and an SGD over
  ``model.parameters()`` (one group, model order, as DeepSpeed's optimizer block builds it:
  the masks are keyed by parameter position in the optimizer).

``zero2`` and ``zero2-resume`` use the shipped ``examples/accelerate_configs/ds_zero2.json``.

Each process writes ``OUT/<RUN>.rank<r>.pt``: the full parameters before training and after
every step (gathered under ZeRO-3), the DropGrad step and per-parameter rates of every
masking, and the positions whose gradient was zero before masking (1 process only).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from hf_dropgrad import destroy_process_groups

DEEPSPEED_JSON = Path(__file__).parents[2] / "examples" / "accelerate_configs" / "ds_zero2.json"
MAX_STEPS = 4
PER_DEVICE = 4
LENGTH = 8
LR = 0.5
SETTINGS = dict(
    dropgrad_rate=0.2, dropgrad_module_rates={"encoder": 0.1, "decoder": 0.3},
    dropgrad_scheduler="linear", dropgrad_final_rate=0.05, dropgrad_seed=7,
)


def tiny_t5() -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=63, d_model=15, d_kv=8, d_ff=33, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(cfg)


def rows() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (MAX_STEPS * 2 * PER_DEVICE, LENGTH), generator=g)
    return [{"input_ids": r, "labels": r.flip(0)} for r in ids]


def deepspeed_config(stage: int, optimizer_block: bool) -> dict:
    config = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
    }
    if optimizer_block:
        config["optimizer"] = {"type": "SGD", "params": {"lr": "auto"}}
        config["zero_allow_untested_optimizer"] = True
    return config


def force_fsdp_on_cpu() -> None:
    """Make Accelerate choose FSDP on a CPU-only machine (it would silently run DDP)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    PartialState._prepare_backend = lambda self, *a, **k: ("gloo", DistributedType.MULTI_GPU)


def gathered(model: torch.nn.Module, stage: int | None) -> dict[str, torch.Tensor]:
    params = list(model.named_parameters())
    if any(hasattr(p, "full_tensor") for _, p in params):  # FSDP2
        return {n: p.full_tensor().detach().clone() for n, p in params}
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def run(name: str, out: Path, rank: int) -> dict:
    import dataclasses

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_dropgrad import DropGradCallback, DropGradTrainer, get_dropgrad
    from hf_dropgrad.integrations import deepspeed as sharding
    from hf_dropgrad.layout import FlatLayout

    kind, *variant = name.split("-")
    stage = int(kind[4:]) if kind.startswith("zero") else None
    fsdp: dict = {}
    if kind == "fsdp2":
        force_fsdp_on_cpu()
        fsdp = dict(fsdp="full_shard", fsdp_config={
            "version": 2, "transformer_layer_cls_to_wrap": ["T5Block"],
        })
    if "accelerate" in variant:
        config = None  # from the launcher: examples/accelerate_configs/deepspeed_zero2.yaml
    elif stage == 2 and "callback" not in variant:
        config: dict | str = str(DEEPSPEED_JSON)  # the shipped example, "auto" fields and all
    else:
        config = deepspeed_config(stage or 0, "callback" in variant)
    model = tiny_t5()  # before the arguments, so ZeRO-3 does not build it partitioned
    if fsdp:  # one tied tensor for fully_shard to shard, not three module attributes
        model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared
    record: dict = {"params": [], "zero_grads": [], "maskings": []}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            dropgrad = get_dropgrad(optimizer)
            record["initial"] = gathered(model, stage)
            # what the optimizer steps: under FSDP2 Accelerate swapped in the DTensor shards
            record["optimizer_params"] = sorted({
                type(p).__name__ for g in dropgrad.param_groups for p in g["params"]
            })
            record["placements"] = {
                n: str(getattr(p, "placements", None)) for n, p in model.named_parameters()
            }
            layout = dropgrad.layout  # Segment(start in partition, numel, position, offset) runs
            record["segments"] = [] if layout is None else [
                (run.start, run.numel, run.position, run.offset)
                for runs in layout.segments.values() for run in runs
            ]

            def hook(*_):
                record["maskings"].append({
                    "step": dropgrad.step_count, "rates": dropgrad.rate_groups(),
                    "per_parameter": dropgrad.current_rates(),
                })

            dropgrad.optimizer.register_step_pre_hook(hook)
            if stage is None:  # positions whose gradient is zero before any mask
                dropgrad.register_step_pre_hook(lambda *_: record["zero_grads"].append(
                    {n: (p.grad == 0).clone() for n, p in model.named_parameters()}
                ))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            record["params"].append(gathered(model, stage))

    resume = "resume" in variant
    args = TrainingArguments(
        output_dir=str(out / (f"{kind}-ckpt" if kind in ("zero2", "zero3") else name)),
        per_device_train_batch_size=PER_DEVICE * (2 if stage is None and not fsdp else 1)
        // (2 if "ga2" in variant else 1),
        gradient_accumulation_steps=2 if "ga2" in variant else 1,
        max_steps=MAX_STEPS, learning_rate=LR if "fud" not in variant else 1e-2,
        optim="adamw_torch" if "fud" in variant else "sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, train_sampling_strategy="sequential", use_cpu=not fsdp,
        report_to="none", seed=7, logging_steps=1, disable_tqdm=True, **fsdp,
        save_strategy="steps" if name in ("zero2", "zero3") else "no", save_steps=2,
        save_only_model=False, average_tokens_across_devices=False, bf16="bf16" in variant,
        deepspeed=None if stage is None else config,
    )
    if "nooffset" in variant:
        real = sharding.zero_layout

        def no_offsets(zero, num_params):  # the bug the offsets prevent
            layout = real(zero, num_params)
            return FlatLayout({
                key: [dataclasses.replace(run, offset=0) for run in runs]
                for key, runs in layout.segments.items()
            }, layout.engine)

        sharding.zero_layout = no_offsets
    common = dict(model=model, args=args, train_dataset=rows())
    try:
        if "callback" in variant:
            callback = DropGradCallback(**{
                ("drop_rate" if k == "dropgrad_rate" else k[len("dropgrad_"):]): v
                for k, v in SETTINGS.items()
            })
            # DeepSpeed's optimizer block holds the parameters in model order, in one group;
            # the 1-process reference does the same (positions key the masks)
            optimizers = (None, None)
            if stage is None:
                optimizers = (torch.optim.SGD(model.parameters(), lr=LR), None)
            trainer = Trainer(**common, callbacks=[callback, Record()], optimizers=optimizers)
        else:
            settings = dict(SETTINGS, dropgrad_full_update_drop="fud" in variant)
            trainer = DropGradTrainer(**common, callbacks=[Record()], **settings)
        checkpoint = str(out / f"{kind}-ckpt" / "checkpoint-2") if resume else None
        trainer.train(resume_from_checkpoint=checkpoint)
        dropgrad = get_dropgrad(trainer)
        record["step_count"] = dropgrad.step_count
        record["global_step"] = trainer.state.global_step
        record["inner"] = type(dropgrad.optimizer).__name__
        record["engine"] = type(getattr(trainer.optimizer, "optimizer", None)).__name__
        record["logged_rates"] = [
            {k: v for k, v in log.items() if k.startswith("dropgrad_rate")}
            for log in trainer.state.log_history if "loss" in log
        ]
    finally:
        if "nooffset" in variant:
            sharding.zero_layout = real
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    return record


def run_loop(name: str) -> dict:
    """``loop-zero<stage>``: a plain DeepSpeed loop (no Trainer) around a ``DropGrad`` made exact
    by ``hf_dropgrad.integrations.deepspeed.attach_deepspeed``; compare with ``single-callback``."""
    import deepspeed
    import torch.distributed as dist

    from hf_dropgrad import DropGrad, LinearDropRateScheduler
    from hf_dropgrad.integrations.deepspeed import attach_deepspeed

    stage = int(name.split("-")[1][4:])
    model = tiny_t5()
    dropgrad = DropGrad(
        torch.optim.SGD(model.parameters(), lr=LR), drop_rate=0.2,
        params={"encoder": 0.1, "decoder": 0.3}, model=model, seed=7,
        drop_rate_scheduler=LinearDropRateScheduler(0.2, 0.05, MAX_STEPS),
    )
    record: dict = {"params": [], "maskings": [], "initial": gathered(model, None)}
    dropgrad.optimizer.register_step_pre_hook(lambda *_: record["maskings"].append({
        "step": dropgrad.step_count, "per_parameter": dropgrad.current_rates(),
    }))
    config = {
        "train_micro_batch_size_per_gpu": PER_DEVICE, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # as the Trainer runs (max_grad_norm=0)
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=dropgrad, config=config)
    attach_deepspeed(engine.optimizer)
    data = rows()
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(MAX_STEPS):
        # the Trainer's order: global step s takes sequences 8s .. 8s+7, 4 per process
        batch = data[(2 * step + rank) * PER_DEVICE : (2 * step + rank + 1) * PER_DEVICE]
        ids = torch.stack([r["input_ids"] for r in batch])
        labels = torch.stack([r["labels"] for r in batch])
        engine.backward(engine(input_ids=ids, labels=labels).loss)
        engine.step()
        record["params"].append(gathered(model, stage))
    record["step_count"] = dropgrad.step_count
    record["world_size"] = world
    return record


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    for name in sys.argv[2:]:
        record = run_loop(name) if name.startswith("loop-") else run(name, out, rank)
        torch.save(record, out / f"{name}.rank{rank}.pt")
        print(f"[rank {rank}] {name} done", flush=True)


if __name__ == "__main__":
    main()
    destroy_process_groups()  # a clean exit (docs/design.md)

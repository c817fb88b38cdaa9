"""Training runs launched by ``tests/test_distributed.py`` in 1 or 2 processes.

    accelerate launch --config_file examples/accelerate_configs/cpu_ddp.yaml \\
        tests/distributed_scripts/ddp_train.py OUT RUN [RUN ...]      # 2 gloo processes
    python tests/distributed_scripts/ddp_train.py OUT RUN [RUN ...]   # 1 process

A RUN is ``<kind>-<masks>-d<dropout>-ga<accumulation>[-s<seed>]``:

- ``kind``: ``trainer`` (a ``DropGradTrainer``) or ``loop`` (a plain Accelerate loop with
  ``accelerator.accumulate`` and ``accelerator.clip_grad_norm_``);
- ``masks``: ``dropgrad`` (the package) or ``naive`` (the same wrapper, but drawing its masks
  with ``torch.bernoulli`` from torch's global RNG, as a per-process RNG wrapper would);
- ``d<dropout>``: the model's dropout rate; ``ga<n>``: gradient accumulation steps;
  ``s<seed>``: DropGrad's seed (default 7).

The setup is the hard case: a tiny T5 built from a config; sequences of uneven length padded
per micro-batch (micro-batches that go to rank 0 are long, those of rank 1 short, so the
ranks see different shapes and, with dropout on, consume torch's RNG differently); every
rank seeded with the same seed; per-module rates ``{"encoder": 0.1, "decoder": 0.3}`` (0.2 for
the rest) scaled by a linear schedule 0.2 -> 0.05; 4 optimizer steps of AdamW with gradient
clipping. The global micro-batches are 4 sequences each, in order: with 2 processes, micro-
batch ``b`` goes to rank ``b % 2`` (Accelerate's batch sharding), so 2 processes x ``ga2`` and
1 process x ``ga4`` take every optimizer step on the same 16 sequences, padded alike.

Every rank writes ``OUT/<RUN>.rank<r>.pt``: final parameters, their SHA-256, the padded
shapes it saw, and for every masking the DropGrad step and rates.

``refuse-fsdp-trainer`` / ``refuse-fsdp-callback`` instead try a ``DropGradTrainer`` / a
``Trainer`` with ``DropGradCallback`` under ``TrainingArguments(fsdp=True)`` with FSDP1
(``fsdp_config={"version": 1}``, flat parameters) and record the error (on a CPU-only machine
Accelerate does not shard, but the arguments ask for FSDP1).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from hf_dropgrad import DropGrad, LinearDropRateScheduler, destroy_process_groups, get_dropgrad
from hf_dropgrad import functional as F

N_SEQUENCES = 64
BATCH = 4
MAX_STEPS = 4
LR = 1e-2
RATE, FINAL_RATE = 0.2, 0.05
MODULE_RATES = {"encoder": 0.1, "decoder": 0.3}
SCRATCH = tempfile.TemporaryDirectory()  # the Trainers' output_dir (nothing is saved there)


class NaiveDropGrad(DropGrad):
    """DropGrad with the masks a per-process RNG wrapper draws (torch's global RNG).

    Same rates, schedule and step path as :class:`DropGrad`; only the source of the
    Bernoulli draws differs, so any divergence across ranks comes from the masks.
    """

    def _mask(self, targets):
        for t in targets:  # MaskTarget(local, key, threshold, scale, name)
            for box in t.local.grads() or ():
                grad = box.tensor
                keep = torch.bernoulli(torch.full_like(grad, 1 - t.threshold / F.RESOLUTION))
                grad.mul_(keep).mul_(t.scale)


def sequences() -> list[dict[str, list[int]]]:
    """Sequence-reversal pairs; micro-batch ``b`` has lengths 6..12 if ``b`` is even, else 2..5."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(N_SEQUENCES):
        low, high = (6, 13) if (i // BATCH) % 2 == 0 else (2, 6)
        length = int(torch.randint(low, high, (1,), generator=g))
        ids = torch.randint(3, 60, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids[::-1]})
    return rows


class PadToLongest:
    """Pads each micro-batch to its own longest sequence and records the padded shapes."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
        self.shapes.append(tuple(ids.shape))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_t5(dropout: float) -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0, dropout_rate=dropout,
    )
    return T5ForConditionalGeneration(cfg)


def record_maskings(dropgrad: DropGrad, log: list[dict]) -> None:
    """Log DropGrad's step and rates each time its inner optimizer steps (after masking)."""

    def hook(*_):
        log.append({"step": dropgrad.step_count, "rates": dropgrad.rate_groups()})

    dropgrad.optimizer.register_step_pre_hook(hook)


def run_trainer(masks: str, dropout: float, ga: int, seed: int) -> tuple:
    from transformers import TrainerCallback, TrainingArguments

    from hf_dropgrad import DropGradTrainer
    from hf_dropgrad.settings import DropGradSettings

    model = tiny_t5(dropout)
    collator = PadToLongest()
    args = TrainingArguments(
        output_dir=SCRATCH.name, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ga, max_steps=MAX_STEPS, learning_rate=LR,
        optim="adamw_torch", lr_scheduler_type="constant", max_grad_norm=1.0,
        train_sampling_strategy="sequential", use_cpu=True, report_to="none",
        save_strategy="no", seed=7, logging_steps=1, disable_tqdm=True,
    )
    settings = dict(drop_rate=RATE, module_rates=MODULE_RATES, scheduler="linear",
                    final_rate=FINAL_RATE, seed=seed)
    optimizers = (None, None)
    if masks == "naive":
        kwargs = DropGradSettings(**settings).dropgrad_kwargs(MAX_STEPS)
        inner = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        optimizers = (NaiveDropGrad(inner, model=model, **kwargs), None)
    log: list[dict] = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            record_maskings(get_dropgrad(optimizer), log)

    # A DropGrad passed through optimizers= is used as it is, without DropGrad settings.
    dropgrad_kwargs = {} if masks == "naive" else {
        f"dropgrad_{k}" if k != "drop_rate" else "dropgrad_rate": v for k, v in settings.items()
    }
    trainer = DropGradTrainer(
        model=model, args=args, train_dataset=sequences(), data_collator=collator,
        optimizers=optimizers, callbacks=[Record()], **dropgrad_kwargs,
    )
    trainer.train()
    dropgrad = get_dropgrad(trainer)
    assert isinstance(dropgrad, NaiveDropGrad if masks == "naive" else DropGrad)
    return trainer.model, dropgrad, collator.shapes, log


def run_loop(masks: str, dropout: float, ga: int, seed: int) -> tuple:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ga)
    set_seed(7)  # the same seed on every rank, as most scripts do
    model = tiny_t5(dropout)
    cls = NaiveDropGrad if masks == "naive" else DropGrad
    optimizer = cls(
        torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0),
        drop_rate=RATE, params=MODULE_RATES, model=model, seed=seed,
        drop_rate_scheduler=LinearDropRateScheduler(RATE, FINAL_RATE, MAX_STEPS),
    )
    log: list[dict] = []
    record_maskings(optimizer, log)
    collator = PadToLongest()
    loader = DataLoader(sequences(), batch_size=BATCH, shuffle=False, collate_fn=collator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()  # AcceleratedOptimizer: the inner step only on sync steps
            optimizer.zero_grad()
    return accelerator.unwrap_model(model), get_dropgrad(optimizer), collator.shapes, log


def run_refusal(how: str) -> dict:
    """``TrainingArguments(fsdp=True)`` with FSDP1 and DropGrad: must fail before any step."""
    from transformers import Trainer, TrainingArguments

    from hf_dropgrad import DropGradCallback, DropGradTrainer

    model = tiny_t5(0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=SCRATCH.name, per_device_train_batch_size=BATCH, max_steps=2,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        fsdp=True, fsdp_config={"version": 2},
    )
    # FSDP1 cannot even be set up on a CPU-only machine (transformers asks for a GPU in
    # __post_init__): switch afterwards, so the arguments DropGrad reads ask for FSDP1.
    args.fsdp_config["version"] = 1
    common = dict(model=model, args=args, train_dataset=sequences(), data_collator=PadToLongest())
    error = None
    trainer = None
    try:
        if how == "trainer":
            trainer = DropGradTrainer(**common, dropgrad_rate=0.1)
        else:
            trainer = Trainer(**common)
            trainer.add_callback(DropGradCallback(drop_rate=0.1))
        trainer.train()
    except ValueError as exc:
        error = str(exc)
    steps = None if trainer is None else trainer.state.global_step
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return {"error": error, "global_step": steps, "unchanged": unchanged}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    for name in sys.argv[2:]:
        if name.startswith("refuse-fsdp-"):
            result = run_refusal(name.rsplit("-", 1)[1])
            torch.save(result, out / f"{name}.rank{rank}.pt")
            print(f"[rank {rank}] {name}: {result['error']}", flush=True)
            continue
        kind, masks, dropout, ga, *rest = name.split("-")
        seed = int(rest[0][1:]) if rest else 7
        runner = {"trainer": run_trainer, "loop": run_loop}[kind]
        model, dropgrad, shapes, log = runner(masks, float(dropout[1:]), int(ga[2:]), seed)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        digest = hashlib.sha256()
        for n, p in params.items():
            digest.update(n.encode())
            digest.update(p.contiguous().view(torch.uint8).numpy().tobytes())
        torch.save(
            {
                "params": params, "sha256": digest.hexdigest(), "shapes": shapes,
                "maskings": log, "step_count": dropgrad.step_count,
                # the process group's size, not the launcher's WORLD_SIZE: a script that
                # does not ask for the CPU gets no process group on a CPU-only machine
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            },
            out / f"{name}.rank{rank}.pt",
        )
        print(f"[rank {rank}] {name}: sha256 {digest.hexdigest()[:16]}", flush=True)


if __name__ == "__main__":
    main()
    destroy_process_groups()  # a clean exit (docs/design.md)

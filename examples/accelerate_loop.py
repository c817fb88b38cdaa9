"""DropGrad in a plain Accelerate training loop (no Trainer).

Trains a tiny T5, built from a config, to reverse sequences of random tokens made in code
(offline, a few seconds on a CPU). The optimizer is wrapped in ``DropGrad`` *before*
``accelerator.prepare``, like any other optimizer, with per-module rates and a rate schedule.

    python examples/accelerate_loop.py
    python examples/accelerate_loop.py --module_rates encoder=0.1,decoder=0.3 \\
        --scheduler linear --final_rate 0.0 --gradient_accumulation_steps 4
    accelerate launch --config_file examples/accelerate_configs/cpu_ddp.yaml \\
        examples/accelerate_loop.py                   # 2 processes on a CPU-only machine
    accelerate launch --config_file examples/accelerate_configs/bf16.yaml \\
        examples/accelerate_loop.py                   # GPUs, bf16 autocast

How DropGrad fits the loop:

- ``accelerator.accumulate`` + ``optimizer.step()`` on every micro-batch: Accelerate's optimizer
  wrapper calls DropGrad's ``step`` only on the micro-batch that syncs gradients, so the mask
  is drawn once per optimizer step, over the accumulated gradient, and DropGrad's step count
  (the step part of the masks' key and the schedule's position) counts optimizer steps.
- ``accelerator.clip_grad_norm_`` runs before ``optimizer.step()``: clipping sees the unmasked
  gradient and the mask is applied to the clipped one. Under fp16 it unscales the gradients
  first; the ``GradScaler`` then skips an inf/NaN step without calling DropGrad, so a skipped
  step draws no mask and does not advance DropGrad's step or schedule.
- Data parallel: the mask is a function of (seed, step, parameter) only, so every process
  draws the same mask and the replicas stay identical (checked at the end of this script).
  FSDP2 and tensor-parallel shards are masked at their elements' indices in the full
  parameters (exact); setups that cannot be exact (FSDP1) are refused with a clear error.
  Under DeepSpeed ZeRO call
  ``hf_dropgrad.integrations.deepspeed.attach_deepspeed(optimizer)`` after ``accelerator.prepare``.
- The end: ``destroy_process_groups()`` (hf_dropgrad/integrations/gloo_exit.py) after ``main()``
  returned, instead of ``accelerator.end_training()``: no multi-process run on the CPU (gloo)
  then aborts or hangs at exit after training succeeded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import T5Config, T5ForConditionalGeneration

from hf_dropgrad import (
    ConstantDropRateScheduler,
    CosineAnnealingDropRateScheduler,
    DropGrad,
    LinearDropRateScheduler,
    destroy_process_groups,
)
from hf_dropgrad.settings import parse_module_rates

PAD = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: the Accelerate config's (or 'no')")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--drop_rate", type=float, default=0.1,
                        help="rate of every parameter no --module_rates pattern matches")
    parser.add_argument("--module_rates", default="encoder=0.1,decoder=0.2",
                        help="per-module rates, e.g. encoder=0.1,decoder=0.2 ('' for none); "
                             "the syntax of --dropgrad_module_rates, so regexes may hold commas "
                             r"inside (), [] or {} (e.g. 'encoder\.block\.\d{1,2}\..*=0.3')")
    parser.add_argument("--scheduler", choices=["constant", "linear", "cosine"],
                        default="linear")
    parser.add_argument("--final_rate", type=float, default=0.05,
                        help="last value of a linear/cosine schedule that starts at --drop_rate")
    parser.add_argument("--max_steps", type=int, default=24, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=8, help="per process")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42, help="model, data and DropGrad seed")
    parser.add_argument("--logging_steps", type=int, default=4)
    parser.add_argument("--output_dir", default=None,
                        help="where to save the model and results.json (optional)")
    parser.add_argument("--cpu", action="store_true",
                        help="train on the CPU (the default where there is no accelerator)")
    return parser.parse_args(argv)


def make_data(n: int, seed: int) -> list[dict[str, list[int]]]:
    """``n`` pairs (tokens -> reversed tokens) of 3 to 12 tokens: uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 13, (1,), generator=g))
        ids = torch.randint(3, 64, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids[::-1]})
    return rows


def pad_to_longest(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": labels}


def tiny_t5(seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=2, dropout_rate=0.1, decoder_start_token_id=PAD, pad_token_id=PAD,
    ))


def drop_rate_scheduler(args: argparse.Namespace):
    if args.scheduler == "linear":
        return LinearDropRateScheduler(args.drop_rate, args.final_rate, args.max_steps)
    if args.scheduler == "cosine":
        return CosineAnnealingDropRateScheduler(args.drop_rate, args.final_rate, args.max_steps)
    return ConstantDropRateScheduler(args.drop_rate)


def parameters_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # On a machine without GPUs Accelerate only starts a (gloo) process group when asked
    # for the CPU: `accelerate launch` with a MULTI_GPU config then runs DDP on the CPU.
    cpu = args.cpu or not torch.accelerator.is_available()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, cpu=cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    from hf_dropgrad.integrations.accelerate import check_supported_setup

    check_supported_setup(None, accelerator)  # FSDP1 & co: a clear error, not wrong masks
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        accelerator.print("note: Accelerate has no fp16 on this device (CPU): training in fp32")
    set_seed(args.seed)  # the same seed on every process

    model = tiny_t5(args.seed)
    # The package's own parser: the same syntax and messages as --dropgrad_module_rates.
    module_rates = parse_module_rates(args.module_rates, "--module_rates")
    optimizer = DropGrad(
        torch.optim.AdamW(model.parameters(), lr=args.learning_rate),
        drop_rate=args.drop_rate,
        params=module_rates or None,
        model=model,
        drop_rate_scheduler=drop_rate_scheduler(args),
        seed=args.seed,
    )
    dropgrad = optimizer  # keep a handle: prepare() wraps it
    micro_batches = args.max_steps * args.gradient_accumulation_steps * accelerator.num_processes
    loader = DataLoader(
        make_data(micro_batches * args.batch_size, args.seed), batch_size=args.batch_size,
        shuffle=True, collate_fn=pad_to_longest,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if accelerator.is_main_process:
        print(f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, "
              f"mixed precision {accelerator.mixed_precision}")
        print(dropgrad.describe())

    losses: list[float] = []
    running, seen, step, micro = 0.0, 0, 0, 0
    model.train()
    while step < args.max_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()  # DropGrad masks, then AdamW steps: on sync steps only
                optimizer.zero_grad()
            micro += 1
            running += accelerator.reduce(loss.detach(), reduction="mean").item()
            seen += 1
            if accelerator.sync_gradients:
                step += 1
                if step % args.logging_steps == 0 or step == args.max_steps:
                    losses.append(running / seen)
                    rates = ", ".join(f"{k}={v:.4g}" for k, v in dropgrad.rate_groups().items())
                    accelerator.print(f"step {step:3d}  loss {running / seen:.4f}  "
                                      f"next rates: {rates}")
                    running, seen = 0.0, 0
                if step == args.max_steps:
                    break

    unwrapped = accelerator.unwrap_model(model)
    digest = parameters_digest(unwrapped)
    key = torch.tensor([int(digest[:15], 16)], device=accelerator.device)
    identical = bool((accelerator.gather(key) == key).all())
    results = {
        "num_processes": accelerator.num_processes,
        "optimizer_steps": step,
        "micro_batches": micro,
        "dropgrad_steps": dropgrad.step_count,
        "final_rates": dropgrad.rate_groups(),
        "losses": losses,
        "parameters_sha256": digest,
        "replicas_identical": identical,
    }
    accelerator.print(
        f"DropGrad drew {dropgrad.step_count} masks in {step} optimizer steps "
        f"({micro} micro-batches per process); final rates: {results['final_rates']}\n"
        f"parameters identical on all {accelerator.num_processes} process(es): {identical}"
    )
    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        accelerator.save_model(model, args.output_dir)
        if accelerator.is_main_process:
            path = Path(args.output_dir) / "results.json"
            path.write_text(json.dumps(results, indent=2))
    if not identical or not all(math.isfinite(x) for x in losses):
        raise SystemExit("replicas diverged or the loss is not finite")
    return results  # the model, the optimizer and the Accelerator go with this frame


if __name__ == "__main__":
    main()
    destroy_process_groups()  # not end_training(): no gloo thread frees anything after this

"""End-to-end cost of DropGrad in a Trainer step on the flagship model (target: <= 1.03x).

Builds the flagship bert2bert (two pretrained MiniLM-L6, 49M parameters, offline) and times
`Trainer` steps (forward, backward, clipping, optimizer step) on fixed batches of the
flagship's shape, alternating runs of a plain `Seq2SeqTrainer` and a `DropGradSeq2SeqTrainer`
(`encoder=0.1,decoder=0.2`, the flagship default) in one process so both see the same
machine state. Prints the median step time of each, their ratio, and the same for the
optimizer step alone (the part DropGrad changes).

    python -m benchmarks.bench_trainer_step            # 2 threads, 3 rounds of 12 steps
    python -m benchmarks.bench_trainer_step --json out.json

(from the repository root). The model comes from ``examples/offline_data.py``, loaded by path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers
from transformers import (
    EncoderDecoderModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)

from hf_dropgrad import DropGradSeq2SeqTrainer


def minilm_path() -> str:
    """``examples/offline_data.py``'s ``minilm_path()`` (the examples are scripts, not a
    package: the module is loaded from its file)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "offline_data.py"
    spec = importlib.util.spec_from_file_location("offline_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.minilm_path()


class StepTimer(TrainerCallback):
    """Wall time of each whole step and of each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.optimizer_steps: list[float] = []
        self._t0 = self._t1 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._t1 = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_steps.append(time.perf_counter() - self._t1)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.perf_counter() - self._t0)


def flagship_model() -> EncoderDecoderModel:
    path = minilm_path()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 101, 0, 102
    return model


def batches(n: int, batch_size: int, src_len: int, tgt_len: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1000, 30000, (src_len,), generator=g).tolist(),
            "attention_mask": [1] * src_len,
            "labels": torch.randint(1000, 30000, (tgt_len,), generator=g).tolist(),
        }
        for _ in range(n * batch_size)
    ]


def run(dropgrad: bool, args: argparse.Namespace, data: list[dict]) -> StepTimer:
    timer = StepTimer()
    targs = Seq2SeqTrainingArguments(
        output_dir="/tmp/bench_trainer_step", per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=3e-4, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, logging_strategy="no", seed=0,
        optim="adamw_torch",
    )
    kwargs = dict(model=flagship_model(), args=targs, train_dataset=data, callbacks=[timer])
    if dropgrad:
        trainer = DropGradSeq2SeqTrainer(
            **kwargs, dropgrad_module_rates={"encoder": 0.1, "decoder": 0.2}
        )
    else:
        trainer = Seq2SeqTrainer(**kwargs)
    trainer.train()
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = batches(args.steps, args.batch_size, src_len=14, tgt_len=12)
    results: dict[str, dict[str, list[float]]] = {
        "baseline": {"step": [], "optimizer": []}, "dropgrad": {"step": [], "optimizer": []}
    }
    for _ in range(args.rounds):  # alternate, so drifts in machine load hit both arms
        for arm in ("baseline", "dropgrad"):
            timer = run(arm == "dropgrad", args, data)
            results[arm]["step"] += timer.steps[2:]  # the first steps warm up allocators
            results[arm]["optimizer"] += timer.optimizer_steps[2:]
    med = {arm: {k: statistics.median(v) for k, v in r.items()} for arm, r in results.items()}
    step_ratio = med["dropgrad"]["step"] / med["baseline"]["step"]
    opt_ratio = med["dropgrad"]["optimizer"] / med["baseline"]["optimizer"]
    load = os.getloadavg()[0]
    print(f"flagship bert2bert (49M params), batch {args.batch_size}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps, load average {load:.2f}")
    print(f"{'':>16} | {'baseline ms':>11} | {'DropGrad ms':>11} | ratio")
    print(f"{'Trainer step':>16} | {med['baseline']['step'] * 1e3:>11.1f} | "
          f"{med['dropgrad']['step'] * 1e3:>11.1f} | {step_ratio:.3f}x")
    print(f"{'optimizer step':>16} | {med['baseline']['optimizer'] * 1e3:>11.1f} | "
          f"{med['dropgrad']['optimizer'] * 1e3:>11.1f} | {opt_ratio:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "median_s": med, "step_ratio": step_ratio, "optimizer_step_ratio": opt_ratio,
            "threads": args.threads, "batch_size": args.batch_size, "load_average": load,
        }, indent=1))


if __name__ == "__main__":
    main()

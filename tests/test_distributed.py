"""Data parallel with real processes (docs/design.md, "Invariants"), and the setups refused at
the start of training (FSDP1, DeepSpeed without ZeRO under fp16/bf16). FSDP2 and DeepSpeed ZeRO
are exact: tests/test_fsdp2.py, tests/test_deepspeed.py.

The multi-process tests launch ``tests/distributed_scripts/ddp_train.py`` (see its docstring
for the setup) with ``accelerate launch --config_file examples/accelerate_configs/cpu_ddp.yaml``:
2 gloo processes on the CPU. One launch runs every 2-process case and one plain ``python`` run
every 1-process case (module-scoped fixtures: starting processes dominates the time).

What is compared, and why:

- Cross-rank identity (model dropout ON, uneven padding, accumulation 2, per-module rates and a
  linear schedule): the parameters of rank 0 and rank 1 are bit-identical after training.
- The same setup with DropGrad's masks replaced by draws from torch's global RNG (a naive
  per-process wrapper) ends with different parameters on the two ranks, although every rank
  was seeded alike: dropout on sequences of different lengths leaves each rank's RNG in a
  different state. So the identity check can fail.
- 1 process vs 2 (model dropout OFF: its masks come from each process's RNG stream and cannot
  match between 1 and 2 processes): 2 processes x 4 sequences x accumulation 2 against 1
  process x 4 sequences x accumulation 4. Doubling the accumulation rather than the batch keeps
  every micro-batch (hence its padding) and the loss normalisation the same: the Trainer
  divides the summed token losses by the number of label tokens over all micro-batches and
  processes and multiplies by the process count, which DDP's averaging undoes; the plain loop
  averages per-micro-batch means over ``accumulation x processes`` micro-batches either way.
  Only the order of the sums differs (DDP all-reduce), so the runs agree to ``atol=1e-6``; a
  1-process run with another DropGrad seed does not, so the comparison can fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate.utils import DistributedType  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_dropgrad import DropGradCallback  # noqa: E402
from hf_dropgrad.callbacks import check_supported_setup  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_scripts" / "ddp_train.py"
CONFIGS = ROOT / "examples" / "accelerate_configs"
EXAMPLE = ROOT / "examples" / "accelerate_loop.py"

TWO_PROCESS_RUNS = [
    "trainer-dropgrad-d0.1-ga2", "trainer-naive-d0.1-ga2", "trainer-dropgrad-d0.0-ga2",
    "loop-dropgrad-d0.1-ga2", "loop-naive-d0.1-ga2", "loop-dropgrad-d0.0-ga2",
    "refuse-fsdp-trainer", "refuse-fsdp-callback",
]
ONE_PROCESS_RUNS = [
    "trainer-dropgrad-d0.0-ga4", "trainer-dropgrad-d0.0-ga4-s8",
    "loop-dropgrad-d0.0-ga4", "loop-dropgrad-d0.0-ga4-s8",
]
# The linear schedule 0.2 -> 0.05 over 4 steps scales each module's base rate by r(k) / r(0).
FACTORS = [1.0, 0.8125, 0.625, 0.4375]
EXPECTED_RATES = [{"encoder": 0.1 * f, "decoder": 0.3 * f} for f in FACTORS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",  # accelerate launch sets it too; with 2 threads tiny ops crawl
        HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
    )
    return env


def run(cmd: list[str], timeout: int = 400, **env_vars: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` (``{port}`` replaced by a free port); fail with its output if it fails."""
    env = {**subprocess_env(), **env_vars}
    for _ in range(2):  # a second try only if another job took the port in between
        proc = subprocess.run(
            [arg.replace("{port}", str(free_port())) for arg in cmd], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def accelerate_launch(config: str, script: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(CONFIGS / config), "--main_process_port", "{port}", str(script), *args,
    ]


class Results:
    def __init__(self, out: Path) -> None:
        self.out = out

    def __call__(self, name: str, rank: int = 0) -> dict:
        return torch.load(self.out / f"{name}.rank{rank}.pt", weights_only=False)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Results:
    out = tmp_path_factory.mktemp("ddp2")
    run(accelerate_launch("cpu_ddp.yaml", SCRIPT, str(out), *TWO_PROCESS_RUNS))
    return Results(out)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Results:
    out = tmp_path_factory.mktemp("ddp1")
    run([sys.executable, str(SCRIPT), str(out), *ONE_PROCESS_RUNS])
    return Results(out)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def initial_parameters() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import ddp_train
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return {n: p.detach().clone() for n, p in ddp_train.tiny_t5(0.0).named_parameters()}


def assert_rates(maskings: list[dict]) -> None:
    assert [m["step"] for m in maskings] == [0, 1, 2, 3]  # one mask per optimizer step
    for got, expected in zip(maskings, EXPECTED_RATES):
        assert got["rates"] == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["trainer", "loop"])
def test_replicas_are_bit_identical_with_dropout_uneven_padding_and_accumulation(
    two_processes: Results, kind: str
) -> None:
    r0, r1 = (two_processes(f"{kind}-dropgrad-d0.1-ga2", rank) for rank in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # the hard case really happened: 8 micro-batches per rank of different padded widths,
    # 4 optimizer steps (one mask each, not one per micro-batch), scheduled per-module rates
    widths0, widths1 = ({w for _, w in r["shapes"]} for r in (r0, r1))
    assert len(r0["shapes"]) == len(r1["shapes"]) == 8
    assert min(widths0) > max(widths1)
    for r in (r0, r1):
        assert r["step_count"] == 4
        assert_rates(r["maskings"])
    assert max_diff(r0["params"], initial_parameters()) > 1e-3  # it trained
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["sha256"] == r1["sha256"]


@pytest.mark.parametrize("kind", ["trainer", "loop"])
def test_naive_per_process_rng_masks_make_replicas_diverge(
    two_processes: Results, kind: str
) -> None:
    r0, r1 = (two_processes(f"{kind}-naive-d0.1-ga2", rank) for rank in (0, 1))
    assert r0["step_count"] == r1["step_count"] == 4
    assert r0["sha256"] != r1["sha256"]
    assert max_diff(r0["params"], r1["params"]) > 1e-4


@pytest.mark.parametrize("kind", ["trainer", "loop"])
def test_two_processes_equal_one_process_on_the_same_global_batch(
    two_processes: Results, one_process: Results, kind: str
) -> None:
    two = [two_processes(f"{kind}-dropgrad-d0.0-ga2", rank) for rank in (0, 1)]
    one = one_process(f"{kind}-dropgrad-d0.0-ga4")
    assert one["world_size"] == 1 and one["step_count"] == 4
    assert_rates(one["maskings"])
    # the single process saw the same micro-batches: rank 0's and rank 1's, interleaved
    interleaved = [s for pair in zip(two[0]["shapes"], two[1]["shapes"]) for s in pair]
    assert one["shapes"] == interleaved
    assert two[0]["sha256"] == two[1]["sha256"]
    assert max_diff(one["params"], two[0]["params"]) <= 1e-6
    # other masks (another DropGrad seed) give another result: the comparison can fail
    other = one_process(f"{kind}-dropgrad-d0.0-ga4-s8")
    assert max_diff(other["params"], two[0]["params"]) > 1e-3


@pytest.mark.parametrize("how", ["trainer", "callback"])
def test_fsdp_arguments_are_refused_before_training_in_two_processes(
    two_processes: Results, how: str
) -> None:
    for rank in (0, 1):
        result = two_processes(f"refuse-fsdp-{how}", rank)
        assert result["error"] is not None and "DropGrad does not support FSDP1" in result["error"]
        assert result["global_step"] in (None, 0)
        assert result["unchanged"]


def example_results(out: Path) -> dict:
    import json

    return json.loads((out / "results.json").read_text())


def test_accelerate_loop_example_under_two_processes(tmp_path) -> None:
    out = tmp_path / "example"
    proc = run(accelerate_launch(
        "cpu_ddp.yaml", EXAMPLE, "--cpu", "--max_steps", "4",
        "--gradient_accumulation_steps", "2", "--logging_steps", "2", "--output_dir", str(out),
    ))
    results = example_results(out)
    assert results["num_processes"] == 2
    # one mask per optimizer step, not per micro-batch, under accelerator.accumulate
    assert results["optimizer_steps"] == results["dropgrad_steps"] == 4
    assert results["micro_batches"] == 8
    assert results["replicas_identical"] is True
    assert results["final_rates"] == pytest.approx({"encoder": 0.05, "decoder": 0.1})
    assert "parameters identical on all 2 process(es): True" in proc.stdout
    assert (out / "model.safetensors").exists()


def test_accelerate_loop_example_in_one_process_with_bf16(tmp_path) -> None:
    out = tmp_path / "example"
    proc = run([
        sys.executable, str(EXAMPLE), "--cpu", "--mixed_precision", "bf16", "--max_steps", "2",
        "--gradient_accumulation_steps", "3", "--logging_steps", "1", "--output_dir", str(out),
    ])
    assert "mixed precision bf16" in proc.stdout
    results = example_results(out)
    assert results["num_processes"] == 1
    assert results["optimizer_steps"] == results["dropgrad_steps"] == 2
    assert results["micro_batches"] == 6
    assert len(results["losses"]) == 2


def test_plain_loop_masks_fsdp2_tensor_parallel_and_partial_gradients() -> None:
    """Outside the Trainer nothing checks the setup: DropGrad itself masks FSDP2's ``Shard(0)``
    gradients, tensor parallel's ``Shard(1)`` and a ``Partial`` gradient as the full
    parameters' (several processes: tests/test_tensor_parallel.py)."""
    script = SCRIPT.parent / "fsdp2_dtensor.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(free_port())], cwd=ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "FSDP2 MASKED " in proc.stdout
    assert "HSDP MASKED (Replicate(), Shard(dim=0))" in proc.stdout
    assert "TP MASKED Shard(1)" in proc.stdout
    assert "PARTIAL MASKED" in proc.stdout


# -- configs ---------------------------------------------------------------------------------


def test_accelerate_configs_parse_as_documented() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: p for p in CONFIGS.glob("*.yaml")}
    assert set(configs) >= {"cpu_ddp", "multi_gpu", "fp16", "bf16", "fsdp2", "deepspeed_zero2"}
    loaded = {name: load_config_from_file(str(path)) for name, path in configs.items()}
    cpu = loaded["cpu_ddp"]
    assert (cpu.distributed_type, cpu.num_processes, cpu.use_cpu) == (
        DistributedType.MULTI_GPU, 2, False
    )
    assert loaded["fp16"].mixed_precision == "fp16"
    assert loaded["bf16"].mixed_precision == "bf16"
    assert loaded["multi_gpu"].distributed_type == DistributedType.MULTI_GPU
    assert loaded["fsdp2"].distributed_type == DistributedType.FSDP
    assert loaded["fsdp2"].fsdp_config["fsdp_version"] == 2
    zero2 = loaded["deepspeed_zero2"]
    assert zero2.distributed_type == DistributedType.DEEPSPEED
    ds_json = ROOT / zero2.deepspeed_config["deepspeed_config_file"]
    ds = json.loads(ds_json.read_text())
    assert ds["zero_optimization"]["stage"] == 2 and "optimizer" not in ds
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    check_supported_setup(SimpleNamespace(deepspeed=str(ds_json), fsdp=None))


# -- what is refused at the start of training ------------------------------------------------


def tiny_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    ))


def rows(n: int = 16) -> list[dict]:
    ids = torch.randint(3, 60, (n, 8), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": r, "labels": int(r[0] % 3)} for r in ids]


def plain_args(tmp_path: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=8,
        report_to="none", save_strategy="no", disable_tqdm=True,
    )


DS_STAGE0_BF16 = {"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": True}}


def test_setups_that_cannot_be_exact_are_refused_and_the_others_accepted(tmp_path) -> None:
    def args(**kwargs) -> SimpleNamespace:
        return SimpleNamespace(**{"fsdp": None, "fsdp_config": None, "deepspeed": None, **kwargs})

    with pytest.raises(ValueError, match="DropGrad does not support FSDP1"):
        check_supported_setup(args(fsdp=True, fsdp_config={"version": 1}))
    check_supported_setup(args(fsdp=True, fsdp_config={"version": 2}))  # FSDP2: exact
    with pytest.raises(ValueError, match="without ZeRO"):
        check_supported_setup(args(deepspeed=DS_STAGE0_BF16))
    # ZeRO with an `optimizer` block: DropGrad wraps DeepSpeed's optimizer (tests/test_deepspeed.py)
    check_supported_setup(args(deepspeed={
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "zero_optimization": {"stage": 2},
    }))
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(DS_STAGE0_BF16))
    with pytest.raises(ValueError, match="without ZeRO"):
        check_supported_setup(args(deepspeed=str(path)))


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_refused_when_only_the_launcher_asked_for_it(tmp_path, kind) -> None:
    """``accelerate launch --use_fsdp`` / ``--use_deepspeed`` leave ``args.fsdp`` and
    ``args.deepspeed`` empty: only the Accelerate state says so. The callback gets it from
    the prepared optimizer (``AcceleratedOptimizer.accelerator_state``)."""
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import TrainerControl, TrainerState

    model = tiny_bert_classifier()
    trainer = Trainer(model=model, args=plain_args(tmp_path), train_dataset=rows())
    prepared = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    # the Accelerate state the launcher's environment would have set up
    prepared.accelerator_state = SimpleNamespace(
        distributed_type=kind, fsdp_plugin=SimpleNamespace(fsdp_version=1),
        deepspeed_plugin=SimpleNamespace(deepspeed_config=DS_STAGE0_BF16),
    )
    match = "FSDP1" if kind == DistributedType.FSDP else "without ZeRO"
    with pytest.raises(ValueError, match=match):
        check_supported_setup(trainer.args, prepared.accelerator_state)
    callback = DropGradCallback(drop_rate=0.1)
    with pytest.raises(ValueError, match=match):
        callback.on_train_begin(
            trainer.args, TrainerState(), TrainerControl(), model=model, optimizer=prepared
        )
    assert callback.dropgrad is None

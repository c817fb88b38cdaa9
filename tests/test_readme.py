"""The README stays true: its flags table is generated from the dataclass help, and its Python
blocks run as written (or say what they need)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_flags_table_is_up_to_date() -> None:
    pytest.importorskip("transformers")
    # This checkout's package, not whichever hf_dropgrad is installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, "scripts/gen_flags_table.py", "--check"],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_flag_is_in_the_readme() -> None:
    from hf_dropgrad.settings import FLAGS

    readme = (ROOT / "README.md").read_text()
    assert len(FLAGS) == 9  # the nine settings of the declaration
    for flag in FLAGS.values():
        assert f"`{flag}`" in readme, flag

# -- the README's Python blocks run as written ---------------------------------------------------
#
# Every ```python block of README.md is preceded by a marker comment:
#
#   <!-- readme-test: runnable with=SETUP (...) -->   run by test_readme_block_runs, in a fresh
#                                                     namespace filled by the set-up SETUP below
#   <!-- readme-test: skip (what it needs) -->        not run; the README text next to it says
#                                                     what it needs (a GPU, a launcher, DeepSpeed)
#
# The set-ups give the names a snippet takes from the reader's own code, on tiny models built
# from configs (no Hub access):
#
#   seq2seq    model: a tiny T5 (encoder-decoder); loss: its loss on a small batch
#   causal_lm  model: a tiny Llama causal LM loaded from a folder that also holds its tokenizer
#              (as a Hub model would be); config: an SFTConfig for 2 steps on the CPU;
#              ds: 16 lines of text
#   classifier model_init: builds a tiny BERT classifier; train_ds, eval_ds: 16 and 8 rows
#
# A block without a marker fails test_every_python_block_is_marked: a new snippet must say
# whether it runs.

MARKER = re.compile(r"<!-- readme-test: (?:runnable with=(?P<setup>\w+)|skip \((?P<needs>[^)]+)\))")


def python_blocks() -> list[tuple[int, str | None, str, str]]:
    """``(line, set-up or None, what a skipped block needs, code)`` of each ```python block."""
    lines = (ROOT / "README.md").read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            marker = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            code = "\n".join(lines[i + 1:end]) + "\n"
            found = MARKER.search(marker)
            setup = found["setup"] if found else None
            needs = found["needs"] if found and found["needs"] else ""
            blocks.append((start + 1, setup, needs if found else "<no marker>", code))
            i = end
        i += 1
    return blocks


def test_every_python_block_is_marked() -> None:
    blocks = python_blocks()
    assert blocks
    unmarked = [line for line, _, needs, _ in blocks if needs == "<no marker>"]
    assert not unmarked, f"README.md python blocks without a readme-test marker at lines {unmarked}"


def _seq2seq(tmp_path: Path) -> dict:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0,
    ))
    ids = torch.randint(1, 64, (4, 6))
    return {"model": model, "loss": model(input_ids=ids, labels=ids.flip(1)).loss}


def _causal_lm(tmp_path: Path) -> dict:
    pytest.importorskip("trl")
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )
    from trl import SFTConfig

    folder = tmp_path / "tiny-llama"
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    text = [" ".join(f"w{int(i)}" for i in torch.randint(0, 29, (8,), generator=g))
            for _ in range(16)]
    return {
        "model": AutoModelForCausalLM.from_pretrained(folder),
        "config": SFTConfig(
            output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
            report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        ),
        "ds": datasets.Dataset.from_dict({"text": text}),
    }


def _classifier(tmp_path: Path) -> dict:
    pytest.importorskip("optuna")
    from tests.trainer_helpers import classification_data, tiny_bert_classifier

    return {
        "model_init": lambda trial=None: tiny_bert_classifier(),
        "train_ds": classification_data(16),
        "eval_ds": classification_data(8),
    }


SETUPS = {"seq2seq": _seq2seq, "causal_lm": _causal_lm, "classifier": _classifier}
RUNNABLE = [b for b in python_blocks() if b[1] is not None]


def test_markers_name_known_setups() -> None:
    assert RUNNABLE, "no README block is marked runnable"
    for line, setup, _, _ in RUNNABLE:
        assert setup in SETUPS, f"README.md:{line}: unknown set-up {setup!r}"


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"line{b[0]}-{b[1]}")
def test_readme_block_runs(block, tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    line, setup, _, code = block
    monkeypatch.chdir(tmp_path)  # anything a snippet writes lands here
    namespace = SETUPS[setup](tmp_path)
    model = namespace.get("model")
    params = model.named_parameters() if model is not None else ()
    before = {n: p.detach().clone() for n, p in params}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # raises if the snippet fails
    # and it did what it shows: a snippet that ran but trained nothing fails here
    if model is not None:
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert changed, f"README.md:{line}: the snippet ran but no parameter of the model changed"
    if "trainer" in namespace and "best" not in namespace:
        state = namespace["trainer"].state
        assert state.global_step == state.max_steps > 0, f"README.md:{line}: {state}"
    if "best" in namespace:  # the hyperparameter search tried DropGrad's settings
        assert {"learning_rate", "dropgrad_rate", "dropgrad_module_rates"} <= set(
            namespace["best"].hyperparameters), namespace["best"]

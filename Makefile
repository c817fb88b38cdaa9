# The two commands of a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: install data demo test test-floor lint bench study study-overfit study-tuned study-speed

install:
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,examples,optim]"

# WordNet (the classification example's data) is a Debian package; best effort, the example
# says what to install when it is missing.
data:
	@test -d /usr/share/wordnet || ( command -v apt-get >/dev/null && \
		(apt-get install -y -q wordnet-base >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wordnet-base >/dev/null 2>&1)) \
		|| echo "note: wordnet-base not installed; the classification example will say so" )

# The flagship: bert2bert MiniLM fine-tuned on CMUdict grapheme-to-phoneme, offline, ~10 min.
demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) examples/run_seq2seq.py

# The main suite on the latest stack, then the Transformers-layer tests on the floor stack.
test: install data
	$(PYTHON) -m ruff check hf_dropgrad tests examples scripts benchmarks studies
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -ra
	$(MAKE) test-floor

# The floor stack (README, "Supported versions") in .venv-floor/, built on first use.
test-floor: data
	PYTHON=$(PYTHON) bash scripts/test_floor.sh

lint:
	$(PYTHON) -m ruff check hf_dropgrad tests examples scripts benchmarks studies

# Benchmarks (benchmarks/) and studies (studies/) run as modules from the repository root.
bench: install
	$(PYTHON) -m benchmarks.bench_overhead
	$(PYTHON) -m benchmarks.bench_trainer_step

# The multi-seed study (docs/analysis.md §5). Every study resumes where it stopped; add
# --report to rebuild its summary.md and plots from its committed results without training.
study: install data
	$(PYTHON) -m studies.study

# Issue 14: the overfitting-regime study (11 arms x 12 seeds, resumable; see docs/analysis.md §6).
study-overfit: install data
	nice -n 10 $(PYTHON) -m studies.study_overfit --seeds 12 --workers 3 --threads 1

# Issue 21: tuned against tuned (3 arms x 4 learning rates x 8 seeds, learning rate chosen on a
# dev split, reported on a test split; resumable; see docs/analysis.md §8).
study-tuned: install data
	nice -n 10 $(PYTHON) -m studies.study_tuned --workers 2 --threads 1

# Issue 28: does DropGrad accelerate optimization? Steps to a dev target and the stable
# learning-rate range, classification and grapheme-to-phoneme (one worker: it shares the machine;
# resumable; see docs/analysis.md §9).
study-speed: install data
	nice -n 19 $(PYTHON) -m studies.study_speed --workers 1 --threads 1

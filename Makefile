# The two commands of a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench

install:
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,examples]"

demo: install
	$(PYTHON) examples/basic_usage.py

test: install
	$(PYTHON) -m ruff check hf_dropgrad tests examples scripts
	$(PYTHON) -m pytest -q -ra

lint:
	$(PYTHON) -m ruff check hf_dropgrad tests examples scripts

bench: install
	$(PYTHON) scripts/bench_overhead.py

"""Session set-up and fixtures shared by every test module."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Triton decides at import whether its kernels run interpreted. Without a GPU the triton backend
# is tested on CPU tensors through the interpreter; with one, on CUDA tensors, compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def trainer_one_process(tmp_path_factory):
    """The 1-process Trainer runs (no engine) that the FSDP2 and DeepSpeed Trainer runs are
    compared with; one launch for both test modules (see sharded_trainer.py)."""
    pytest.importorskip("transformers")
    from tests.sharded_helpers import TRAINER_SCRIPT, Runs, launch

    out = tmp_path_factory.mktemp("trainer_one_process")
    runs = ["single", "single-callback", "single-fud"]
    launch([sys.executable, str(TRAINER_SCRIPT), str(out), *runs])
    return Runs(out)


@pytest.fixture
def transformers_logs():
    """What transformers' loggers print during the test (``handler.text``)."""
    pytest.importorskip("transformers")
    from tests.trainer_helpers import capture_transformers_logs

    with capture_transformers_logs() as handler:
        yield handler

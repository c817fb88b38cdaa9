"""Loading the study scripts of scripts/ (not a package) in the tests of the studies."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
#: The modules of scripts/ a study script may import; forgotten after each test module.
STUDY_MODULES = ("study_harness", "study", "study_overfit", "study_tuned")


@contextlib.contextmanager
def study_script(name: str) -> Iterator[ModuleType]:
    """Import ``scripts/<name>.py`` the way ``python scripts/<name>.py`` finds its imports
    (``scripts/`` first on ``sys.path``), and forget it (and the harness) afterwards."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module(name)
    finally:
        for module in STUDY_MODULES:
            sys.modules.pop(module, None)
        sys.path.remove(str(SCRIPTS))


def require_offline_data() -> None:
    """Skip unless transformers, the MiniLM package and WordNet are installed."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from offline_data import MissingDataError, minilm_path, wordnet_dir

        try:
            minilm_path(), wordnet_dir()
        except MissingDataError as error:
            pytest.skip(str(error))
    finally:
        sys.path.remove(str(ROOT / "examples"))

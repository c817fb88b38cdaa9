"""What the tests of the studies (studies/) share."""

from __future__ import annotations

import pytest

from studies.study_harness import load_example


def require_offline_data() -> None:
    """Skip unless transformers, the MiniLM package and WordNet are installed."""
    pytest.importorskip("transformers")
    offline_data = load_example("offline_data")
    try:
        offline_data.minilm_path(), offline_data.wordnet_dir()
    except offline_data.MissingDataError as error:
        pytest.skip(str(error))

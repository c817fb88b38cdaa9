"""The README stays true: its flags table is generated from the dataclass help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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

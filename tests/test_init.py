"""The package face (hf_dropgrad/__init__.py) and the import rules of docs/design.md."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hf_dropgrad

PACKAGE = Path(hf_dropgrad.__file__).parent
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def _imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def _is_submodule(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()


def test_core_and_settings_do_not_import_transformers() -> None:
    code = (
        "import sys\n"
        "from hf_dropgrad import DropGrad, ConstantDropRateScheduler, LinearDropRateScheduler\n"
        "from hf_dropgrad import CosineAnnealingDropRateScheduler, StepDropRateScheduler\n"
        "import hf_dropgrad.settings, hf_dropgrad.patterns\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trainer_layer_is_lazy() -> None:
    from hf_dropgrad.callbacks import DropGradCallback
    from hf_dropgrad.trainer import DropGradSeq2SeqTrainer, DropGradTrainer
    from hf_dropgrad.training_args import (
        DropGradSeq2SeqTrainingArguments,
        DropGradTrainingArguments,
    )

    assert hf_dropgrad.DropGradCallback is DropGradCallback
    assert hf_dropgrad.DropGradTrainer is DropGradTrainer
    assert hf_dropgrad.DropGradSeq2SeqTrainer is DropGradSeq2SeqTrainer
    assert hf_dropgrad.DropGradTrainingArguments is DropGradTrainingArguments
    assert hf_dropgrad.DropGradSeq2SeqTrainingArguments is DropGradSeq2SeqTrainingArguments
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        hf_dropgrad.Nope  # noqa: B018


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_the_package_face(path: Path) -> None:
    for node in _imports(path):
        if isinstance(node, ast.Import):
            assert all(alias.name != "hf_dropgrad" for alias in node.names), (path, node.lineno)
        elif node.module == "hf_dropgrad" and node.level == 0:
            for alias in node.names:
                assert _is_submodule(alias.name), (
                    f"{path.name}:{node.lineno} imports {alias.name!r} from the package face; "
                    "import it from the module that defines it"
                )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_across_modules(path: Path) -> None:
    for node in _imports(path):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_dropgrad."):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{path.name}:{node.lineno} imports {private} from {node.module}"


def test_settings_imports_no_transformers_and_the_core_directly() -> None:
    modules = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in _imports(PACKAGE / "settings.py")
        for alias in node.names
    }
    assert {"hf_dropgrad.schedulers", "hf_dropgrad.patterns"} <= modules
    assert not any(str(m).startswith(("transformers", "accelerate")) for m in modules)

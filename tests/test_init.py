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


#: The modules that must import without Transformers or Accelerate (docs/design.md): the
#: torch core, the settings (Transformers-free by design), the engines' integrations and the
#: installer that plugs them in.
TRANSFORMERS_FREE = [
    "hf_dropgrad",
    "hf_dropgrad.optimizer",
    "hf_dropgrad.functional",
    "hf_dropgrad.schedulers",
    "hf_dropgrad.patterns",
    "hf_dropgrad.rates",
    "hf_dropgrad.report",
    "hf_dropgrad.layout",
    "hf_dropgrad.in_backward",
    "hf_dropgrad.kernels",
    "hf_dropgrad.arguments",
    "hf_dropgrad.settings",
    "hf_dropgrad.install",
    "hf_dropgrad.model_card",  # the Transformers layer's card and tracker hooks: text and data
    "hf_dropgrad.run_config",
    "hf_dropgrad.integrations.deepspeed",
    "hf_dropgrad.integrations.fsdp",
    "hf_dropgrad.integrations.accelerate",
    "hf_dropgrad.integrations.in_backward",
]


def test_core_settings_and_integrations_do_not_import_transformers() -> None:
    """The one check of the import rule: each module alone, in a fresh interpreter."""
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        # kernels.ops stays loaded: its torch.library ops can be defined once per process.
        "    for loaded in [m for m in sys.modules if m.startswith('hf_dropgrad')\n"
        "                   and m != 'hf_dropgrad.kernels.ops']:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "    if name == 'hf_dropgrad':\n"
        "        from hf_dropgrad import DropGrad, ConstantDropRateScheduler  # noqa: F401\n"
        "        from hf_dropgrad import LinearDropRateScheduler, StepDropRateScheduler  # noqa\n"
        "        from hf_dropgrad import CosineAnnealingDropRateScheduler  # noqa: F401\n"
        "    bad = {'transformers', 'accelerate', 'deepspeed'} & set(sys.modules)\n"
        "    assert not bad, f'{name} imports {sorted(bad)}'\n"
    )
    subprocess.run([sys.executable, "-c", code, *TRANSFORMERS_FREE], check=True)


def test_the_core_imports_no_integration_and_no_private_torch_module() -> None:
    core = [PACKAGE / f"{name}.py" for name in (
        "optimizer", "functional", "schedulers", "patterns", "rates", "report", "layout",
        "in_backward", "settings",
    )] + sorted((PACKAGE / "kernels").glob("*.py"))
    for path in core:
        for node in _imports(path):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                alias.name for alias in node.names
            ]
            for name in names:
                assert not name.startswith(("hf_dropgrad.integrations", "deepspeed")), (
                    path.name, name
                )
                assert "._" not in name, f"{path.name} imports the private module {name}"


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


def test_settings_imports_the_core_directly() -> None:
    modules = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in _imports(PACKAGE / "settings.py")
        for alias in node.names
    }
    assert {"hf_dropgrad.schedulers", "hf_dropgrad.patterns"} <= modules


@pytest.mark.parametrize(
    "path", [p for p in MODULES if p.parent.name != "kernels"],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_nothing_outside_the_kernels_names_a_backend(path: Path) -> None:
    """The backend protocol (docs/design.md): callers take a plan from kernels.choose and call
    its module; they never compare with a backend's name or import a backend module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                consts = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
                for const in consts:
                    assert not (isinstance(const, ast.Constant)
                                and const.value in ("cpp", "triton", "torch")), (
                        f"{path.name}:{node.lineno} compares with a backend name"
                    )
    # functional.py's public oracle (mask_reference_, keep_mask_reference, random_bits) is the
    # reference path by definition: those three names, and nothing else, come from it.
    oracle = {"mask_tensor_", "keep_mask", "random_bits"}
    for node in _imports(path):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
            a.name for a in node.names]
        if (path.name == "functional.py" and isinstance(node, ast.ImportFrom)
                and node.module == "hf_dropgrad.kernels.reference"
                and {a.name for a in node.names} <= oracle):
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "hf_dropgrad.kernels":
            names += [f"hf_dropgrad.kernels.{a.name}" for a in node.names]
        for name in names:
            assert name not in {"hf_dropgrad.kernels.cpp", "hf_dropgrad.kernels.triton",
                                "hf_dropgrad.kernels.reference", "hf_dropgrad.kernels.ops"}, (
                f"{path.name}:{node.lineno} imports the backend module {name}"
            )

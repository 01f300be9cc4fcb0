"""The layers point one way (DESIGN.md): cli -> pipelines -> components -> the library, and inside the library
models < data < training < stages < runner/cluster. Read from every import statement, function-level ones too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src" / "nemoforge"
TOP_LAYERS = ("kfp", "nemoforge_components", "nemoforge_pipelines", "nemoforge_cli")
LIBRARY_ORDER = ("models", "data", "training", "stages", "runner")
"""Library packages from the bottom up: each may import those before it, never those after."""


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _library() -> dict[str, set[str]]:
    return {_module(path): _imports(path) for path in sorted(SRC.rglob("*.py"))}


def test_the_library_never_imports_kfp_or_the_layers_above_it():
    wrong = {
        (module, name)
        for module, names in _library().items()
        for name in names
        if name.split(".")[0] in TOP_LAYERS
    }
    assert not wrong


def _rank(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LIBRARY_ORDER:
        return LIBRARY_ORDER.index(parts[1])
    if len(parts) > 1 and parts[1] == "cluster":
        return LIBRARY_ORDER.index("runner")
    return None


def test_library_imports_point_down():
    wrong = set()
    for module, names in _library().items():
        for name in names:
            low, high = _rank(module), _rank(name)
            if low is not None and high is not None and high > low:
                wrong.add((module, name))
    assert not wrong


def test_a_stage_package_imports_no_other_stage():
    """Stages share code through modules of ``stages/`` itself (result, training, chat), never a sibling stage."""
    stage_packages = {p.name for p in (SRC / "stages").iterdir() if (p / "__init__.py").is_file()}
    wrong = set()
    for module, names in _library().items():
        parts = module.split(".")
        if len(parts) < 4 or parts[1] != "stages":
            continue
        for name in names:
            other = name.split(".")
            if (
                other[:2] == ["nemoforge", "stages"]
                and len(other) > 2
                and other[2] in stage_packages - {parts[2]}
            ):
                wrong.add((module, name))
    assert not wrong


def test_only_the_lineage_package_imports_mlflow():
    wrong = {
        (module, name)
        for module, names in _library().items()
        for name in names
        if name.split(".")[0] == "mlflow" and not module.startswith("nemoforge.lineage")
    }
    assert not wrong

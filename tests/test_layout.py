"""The package's layout holds (issue 25): small classes, a one-screen training step, and an
algorithm that never names a model family (families are :mod:`marble_pl.policies`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "marble_pl"
MAX_CLASS_LINES = 400
MAX_STEP_LINES = 60


def _classes() -> list[tuple[str, ast.ClassDef]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        found += [(str(path.relative_to(PACKAGE)), node) for node in ast.walk(tree)]
    return [(where, node) for where, node in found if isinstance(node, ast.ClassDef)]


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_no_class_in_the_package_is_over_400_lines():
    classes = _classes()
    assert any(node.name == "MarbleModule" for _, node in classes)
    big = {f"{where}:{node.name}": _lines(node) for where, node in classes}
    assert {k: v for k, v in big.items() if v > MAX_CLASS_LINES} == {}


def test_training_step_fits_one_screen():
    (module,) = [node for where, node in _classes() if node.name == "MarbleModule"]
    (step,) = [f for f in module.body if getattr(f, "name", None) == "training_step"]
    assert _lines(step) < MAX_STEP_LINES


def test_the_algorithm_never_names_a_model_family():
    text = (PACKAGE / "module.py").read_text()
    for family in ("SD3", "StableDiffusion3", "Flux", "FLUX"):
        assert family not in text, family


def test_every_subpackage_is_installed():
    """pyproject's explicit package list names every folder of the package (a non-editable
    install, as the Dockerfile's, would silently leave an unlisted one out)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")
    }
    mapped = set(config.get("package-dir", {}))  # packages kept outside marble_pl/ (callbacks)
    assert found | mapped == listed

"""The README's two set-up commands are the ones CI runs (issue 23, item 1)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_command(which: str) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme_command.py"), which],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_ci_runs_the_readme_test_command_as_written():
    test = _readme_command("test")
    assert test == (
        'pip install torch==2.13.0 && pip install -e ".[test]" && ruff check . && '
        "ruff format --check . && python -m pytest -q"
    )
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'test_command="$(python3 .ci/readme_command.py test)"' in ci
    # the README's command is the LAST thing CI does, and CI installs nothing of its own
    assert ci.rstrip().endswith('bash -euo pipefail -c "$test_command"')
    assert "pip install" not in ci and "pytest" not in ci.replace("pytest exits 5", "")


def test_readme_main_command_runs_the_tiny_config():
    main = _readme_command("main")
    assert main.startswith("pip install torch==2.13.0 && pip install -e . && ")
    assert main.endswith("marble fit --config configs/tiny.yaml")


def test_test_extra_installs_what_the_tests_import():
    """``.[test]`` alone must run every test: torchjd (toy study, balancers) included."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI: 3.11)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {d.split(">")[0].split("=")[0].split("[")[0].split("!")[0] for d in extras["test"]}
    for needed in ("ruff", "pytest", "torchjd", "scipy", "matplotlib", "pyyaml", "scikit-learn"):
        assert needed in names, needed
    for balancer_dep in extras["balancers"]:
        assert balancer_dep in extras["test"], balancer_dep
    assert importlib.util.find_spec("torchjd") is not None

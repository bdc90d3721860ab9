"""A new user's first runs with the installed ``marble`` script: no traceback, no alarming noise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Notices a first run must not print (each once alarmed a user, none asks for an action).
FORBIDDEN = (
    "Traceback",
    "was called without a model",  # Lightning's silent resume of OnExceptionCheckpoint
    "there is no last checkpoint available",
    "not resumable",  # "your dataloader is not resumable" on a resume
    "requires torchvision",
    "Epoch 1/-2",
    "/-2",
    "part of your input was truncated",  # diffusers' per-call truncation dump
    "Token indices sequence length",
    "litlogger",
    "exists and is not empty",
)


def marble_script() -> str:
    """The console script installed next to this interpreter (what ``pip install`` created)."""
    script = Path(sys.executable).with_name("marble")
    return str(script) if script.exists() else shutil.which("marble") or "marble"


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MARBLE_DEBUG", None)
    return subprocess.run(
        [marble_script(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_quiet(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    found = [f for f in FORBIDDEN if f in out]
    assert not found, f"{found} in:\n{out[-6000:]}"
    return out


@pytest.mark.slow
def test_first_runs_rerun_and_resume_print_no_traceback_and_no_noise(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "configs", repo / "configs")
    train = repo / "configs" / "prompts" / "tiny_train.txt"
    with train.open("a", encoding="utf-8") as f:
        f.write("a red fox in the snow " * 2300 + "\n")  # ~50,000 characters: truncated, once
    first = run(repo, "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps=3")
    assert first.returncode == 0, first.stderr[-6000:]
    out = assert_quiet(first)
    assert out.count("are truncated; said once") == 1
    assert "step 3/3" in out  # the progress bar counts optimizer steps
    assert (repo / "runs" / "tiny-sd3" / "model_index.json").is_file()  # built on first use

    # The same command again: a new run, nothing restored.
    again = run(repo, "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps=3")
    assert again.returncode == 0, again.stderr[-6000:]
    assert "Restoring states" not in assert_quiet(again)
    runs = repo / "runs" / "tiny"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]

    # Resume mid-epoch (3 batches of the first epoch done): no "not resumable" warning.
    resumed = run(
        repo, "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps=4", "--ckpt_path=last"
    )
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    out = assert_quiet(resumed)
    assert f"marble: resuming {Path('runs/tiny/version_1/checkpoints/last.ckpt')} (step 3)" in out

    # A user error: one line, exit code 2.
    bad = run(repo, "fit", "--config", "configs/tiny.yaml", "--model.rewards=[brightnes]")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("marble: error:") and "brightness" in last

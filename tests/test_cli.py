"""`marble fit --config configs/tiny.yaml` end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

REQUIRED_TAGS = [
    "loss",
    "reward/brightness/mean",
    "reward/saturation/mean",
    "reward/compressibility/mean",
    "lambda/brightness",
    "lambda_ema/compressibility",
    "qp/solve_ms",
    "qp/status",
    "time/rollout_s",
    "time/update_s",
    "cos/brightness",
    "cos/min",
    "cos_ws/saturation",
    "cos_ws/min",
    "cos/frac_min_negative",
    "cos_ws/frac_min_negative",
]


def marble(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "marble_pl.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"marble {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def events(log_dir: Path) -> EventAccumulator:
    """The newest event file of a run folder (a resumed run appends a second one)."""
    event_file = max(log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    acc = EventAccumulator(str(event_file), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    return acc


def scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = events(log_dir)
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_fit_tiny_writes_tensorboard_and_resumes(tmp_path, tiny_sd3_path):
    common = [
        "--config",
        str(TINY),
        f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
        f"--data.train_file={ROOT / 'configs/prompts/tiny_train.txt'}",
        f"--data.val_file={ROOT / 'configs/prompts/tiny_val.txt'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
    ]
    marble("fit", *common, "--trainer.max_steps=2", cwd=ROOT)
    run = tmp_path / "runs" / "tiny" / "version_0"
    values = scalars(run)
    missing = [t for t in REQUIRED_TAGS if t not in values]
    assert not missing, f"missing tags {missing}; have {sorted(values)}"
    assert len(values["loss"]) == 2
    # The shipped config balances in an exact space: its cosines are parameter-space ones and
    # the guarded coefficients push no reward backwards on any step.
    assert yaml.safe_load(TINY.read_text())["model"]["gradient_space"] in ("gramian", "parameters")
    assert len(values["cos/min"]) == 2 and min(values["cos/min"]) >= -1e-6, values["cos/min"]
    assert "val/reward/brightness" in values
    tags = events(run).Tags()
    assert "samples/validation" in tags["images"]
    assert {"reward_hist/brightness", "reward_hist/compressibility"} <= set(tags["histograms"])
    # 4 validation prompts x 2 seeds of 32 px, padding 2: (4 * 34 + 2) x (2 * 34 + 2).
    png = run / "samples" / "validation_step000002.png"
    with Image.open(png) as image:
        assert image.size == (70, 138)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()  # LoraExport
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    assert any("CoefficientEMA" in k for k in state["callbacks"])

    frac = values["cos/frac_min_negative"][-1]
    proc = marble("fit", *common, "--trainer.max_steps=4", f"--ckpt_path={ckpt}", cwd=ROOT)
    assert f"marble: resuming {ckpt} (step 2) in {run}" in proc.stderr
    resumed = run  # a resume continues in the run's own folder
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    state = torch.load(
        resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert state["global_step"] == 4
    ema_state = next(v for k, v in state["callbacks"].items() if "CoefficientEMA" in k)
    assert ema_state["step"] == 4  # the EMA went on from the checkpoint, not from scratch
    resumed_values = scalars(resumed)
    assert len(resumed_values["loss"]) == 2
    cos_state = next(v for k, v in state["callbacks"].items() if "GradientCosineMonitor" in k)
    assert cos_state["steps"] == 4  # running fractions continue across the resume
    assert resumed_values["cos/frac_min_negative"][-1] == pytest.approx(cos_state["negative"] / 4)
    # The shipped config's promise, across the resume: no step pushed a reward backwards.
    assert frac == 0.0 and cos_state["negative"] == 0
    assert min(resumed_values["cos/min"]) >= -1e-6


@pytest.mark.slow
def test_validate_and_print_config(tmp_path, tiny_sd3_path):
    proc = marble("fit", "--config", str(TINY), "--print_config", cwd=tmp_path)
    assert "balancer: marble" in proc.stdout and "CoefficientEMA" in proc.stdout
    marble(
        "validate",
        "--config",
        str(TINY),
        f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
        f"--data.train_file={ROOT / 'configs/prompts/tiny_train.txt'}",
        f"--data.val_file={ROOT / 'configs/prompts/tiny_val.txt'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        cwd=ROOT,
    )
    values = scalars(tmp_path / "runs" / "tiny" / "version_0")
    assert "val/reward/saturation" in values


def test_unknown_config_key_is_rejected(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "marble_pl.cli", "fit", "--config", str(TINY), "--model.betaa=0.5"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "betaa" in proc.stderr

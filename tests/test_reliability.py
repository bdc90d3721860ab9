"""Exact resume, pre-emption, and faults that must neither crash nor poison a run."""

from __future__ import annotations

import ast
import copy
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from marble_pl.callbacks import CoefficientEMA, GradientCosineMonitor, PreemptionSignal
from test_module import PROMPTS, fit, make_module, nan_on_first_backward, randomise_lora_b

from marble_pl.balance import MinNormSolver
from marble_pl.data import PromptDataModule
from marble_pl.module import MarbleModule
from marble_pl.rewards import Reward, register_reward

ROOT = Path(__file__).resolve().parents[1]


class Record(Callback):
    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.weights: list[list[float]] = []
        self.loss: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.prompts.append(batch["prompts"][0])
        self.weights.append(pl_module.last_step.weights.tolist())
        self.loss.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))


def _run(model_path, steps, ckpt_dir, ckpt_path=None):
    seed_everything(0)
    module = make_module(
        model_path, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), gradient_clip_norm=1.0
    )
    record, ema, monitor = Record(), CoefficientEMA(0.9), GradientCosineMonitor()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            ema,
            monitor,
            record,
            ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1, save_top_k=-1),
        ],
    )
    data = PromptDataModule(str(PROMPTS), batch_size=2, group_size=3, seed=0)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, record, ema, monitor


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, tiny_sd3_path):
    full, rec_full, ema_full, cos_full = _run(tiny_sd3_path, 4, tmp_path / "full")
    _, rec_a, _, _ = _run(tiny_sd3_path, 2, tmp_path / "part")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, rec_b, ema_b, cos_b = _run(
            tiny_sd3_path, 4, tmp_path / "resumed", ckpt_path=tmp_path / "part" / "last.ckpt"
        )
    # Lightning saved and restored the train loader's position: no "not resumable" warning.
    assert not [w for w in caught if "not resumable" in str(w.message)]
    # The same prompts in the same order (mid-epoch resume), the same coefficients and losses...
    assert rec_a.prompts + rec_b.prompts == rec_full.prompts
    assert rec_a.weights + rec_b.weights == rec_full.weights
    assert rec_a.loss + rec_b.loss == rec_full.loss
    # ... the same EMA, cosine statistics, QP warm start and optimizer state ...
    assert ema_b.state_dict() == ema_full.state_dict()
    assert cos_b.state_dict() == cos_full.state_dict()
    np.testing.assert_array_equal(resumed.balancer.warm_start, full.balancer.warm_start)
    assert resumed.counters == full.counters
    # ... and bit-identical LoRA weights, trained and sampling adapters alike.
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        if "lora_" in name:
            assert torch.equal(a, b), name
    state_a = full.trainer.optimizers[0].state_dict()["state"]
    state_b = resumed.trainer.optimizers[0].state_dict()["state"]
    for key in state_a:
        assert torch.equal(state_a[key]["exp_avg"], state_b[key]["exp_avg"])


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_138_and_the_run_resumes_in_its_folder(tmp_path, tiny_sd3_path):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith(".ModelCheckpoint"):
            cb["init_args"].update(every_n_train_steps=1)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["max_steps"] = 10_000
    config["model"]["pretrained_model_name_or_path"] = str(tiny_sd3_path)
    config["data"]["train_file"] = str(ROOT / "configs/prompts/tiny_train.txt")
    config["data"]["val_file"] = str(ROOT / "configs/prompts/tiny_val.txt")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "marble_pl.cli", "fit", "--config", str(cfg)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run = tmp_path / "runs" / "tiny" / "version_0"
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR1, out[-4000:]  # 138: not a finished run
    assert "stopped by SIGUSR1" in out.strip().splitlines()[-1]
    (saved,) = (run / "checkpoints").glob("interrupted-step=*.ckpt")
    step = torch.load(saved, map_location="cpu", weights_only=False)["global_step"]
    assert 1 <= step < 10_000
    assert saved.name == f"interrupted-step={step:06d}.ckpt"
    resume = subprocess.run(
        [*cmd, f"--trainer.max_steps={step + 1}", "--ckpt_path=last"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resume.returncode == 0, resume.stderr[-4000:]
    assert f"resuming {saved} (step {step}) in {run}" in resume.stderr
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # the same run
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == step + 1
    assert saved.exists()  # an interrupt checkpoint is never deleted by a resume


def test_preemption_signal_arguments():
    with pytest.raises(ValueError, match="unknown signal"):
        PreemptionSignal(signals=["SIGNOPE"])
    with pytest.raises(ValueError, match="Lightning itself"):
        PreemptionSignal(signals=["SIGTERM"])


def test_osqp_failure_falls_back_and_training_continues(tiny_sd3_path, monkeypatch):
    module = make_module(tiny_sd3_path, balancer={"class_path": "MinNormBalancer"})
    module.balancer.solver = MinNormSolver(max_iter=1)  # never reaches "solved"
    fit(module, steps=2)
    assert module.counters["qp_fallbacks"] == 2
    rec = module.last_step
    assert rec.balance.fallback and rec.balance.status != "solved"
    assert np.all(rec.weights >= 0) and abs(rec.weights.sum() - 1) < 1e-9

    def broken(self, *args, **kwargs):
        raise RuntimeError("workspace corrupted")

    module = make_module(tiny_sd3_path)
    monkeypatch.setattr("osqp.OSQP.solve", broken)
    fit(module, steps=1)
    assert module.last_step.balance.status.startswith("error: RuntimeError")
    assert module.counters["qp_fallbacks"] == 1


@register_reward("test_constant")
class Constant(Reward):
    """The same score for every image: no signal at all."""

    def forward(self, images, prompts):
        return torch.zeros(images.shape[0])


def _lora(module: MarbleModule, adapter: str) -> dict[str, torch.Tensor]:
    return {
        k.replace(f".{adapter}.", "."): v.detach().clone()
        for k, v in module.named_parameters()
        if f"lora_A.{adapter}." in k or f"lora_B.{adapter}." in k
    }


@pytest.mark.parametrize("space", ["output", "parameters"])
def test_all_zero_gradients_skip_the_update(tiny_sd3_path, space):
    """Constant rewards (r = 0.5 everywhere) while v_theta == v_old (both adapters start
    equal): every gradient is exactly zero and the step is skipped, weight decay included
    (AdamW would otherwise shrink the LoRA by lr * weight_decay)."""
    module = make_module(
        tiny_sd3_path,
        rewards=["test_constant", {"name": "test_constant", "alias": "constant2"}],
        gradient_space=space,
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
    )
    randomise_lora_b(module, adapters=("default", "old"))  # the same values in both adapters
    before, old = _lora(module, "default"), _lora(module, "old")
    assert all(torch.equal(v, old[k]) for k, v in before.items())  # v_theta == v_old
    fit(module, steps=2)
    assert module.counters["skipped_zero_grad"] == 2
    if space == "parameters":  # exact zeros (the output-space Gram is round-off, ~1e-16)
        assert module.last_step.balance.status == "zero_gram"
    assert module.trainer.global_step == 2  # skipped steps still count towards max_steps
    after = _lora(module, "default")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("space", ["output", "parameters"])
def test_neutral_rewards_still_pull_v_theta_to_v_old(tiny_sd3_path, space):
    """r = 0.5 is no REWARD push, not no update: with v_theta != v_old the NFT loss at r = 0.5
    is beta^2 ||v_theta - v_old||^2 up to a constant, so the step is taken, towards v_old."""
    module = make_module(
        tiny_sd3_path,
        rewards=["test_constant", {"name": "test_constant", "alias": "constant2"}],
        gradient_space=space,
        old_policy_decay=1.0,  # v_old stays where it is: the pull has a fixed target
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
    )
    randomise_lora_b(module)  # only the trained adapter: v_theta != v_old
    before, old = _lora(module, "default"), _lora(module, "old")
    fit(module, steps=1)
    after = _lora(module, "default")
    assert module.counters["skipped_zero_grad"] == 0
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    step = torch.cat([(after[k] - before[k]).flatten() for k in before])
    towards_old = torch.cat([(old[k] - before[k]).flatten() for k in before])
    assert float(step @ towards_old) > 0  # the LoRA moved towards the sampling adapter


def test_nonfinite_updates_are_skipped_then_stop_the_run(tiny_sd3_path, monkeypatch):
    original = MarbleModule.velocity

    def nan_when_training(self, x_t, t, embeds, pooled):
        v = original(self, x_t, t, embeds, pooled)
        return v * float("nan") if torch.is_grad_enabled() else v

    monkeypatch.setattr(MarbleModule, "velocity", nan_when_training)
    module = make_module(tiny_sd3_path, max_nonfinite_steps=2)
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.named_parameters() if "lora_" in k}
    with pytest.raises(FloatingPointError, match="NaN/inf in 2 steps in a row"):
        fit(module, steps=5)
    assert module.counters["skipped_nonfinite"] == 2
    for k, v in module.named_parameters():
        if "lora_" in k:
            assert torch.equal(before[k], v), k  # nothing NaN reached the weights


def test_one_nonfinite_update_is_skipped_and_counted(tiny_sd3_path, monkeypatch):
    nan_on_first_backward(monkeypatch)
    module = make_module(tiny_sd3_path)
    fit(module, steps=3)
    assert module.counters["skipped_nonfinite"] == 1 and module.counters["nonfinite_streak"] == 0
    assert all(torch.isfinite(p).all() for p in module.lora_params)


def test_loading_is_safe_by_construction():
    """No trust_remote_code anywhere; every torch.load passes weights_only=True."""
    offenders = []
    for path in [
        *ROOT.joinpath("marble_pl").rglob("*.py"),
        *ROOT.joinpath("callbacks").rglob("*.py"),
    ]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            kwargs = {kw.arg: kw.value for kw in node.keywords}
            trust = kwargs.get("trust_remote_code")
            if isinstance(trust, ast.Constant) and trust.value is True:
                offenders.append(f"{path}:{node.lineno} trust_remote_code=True")
            func = ast.unparse(node.func)
            if func.endswith("torch.load"):
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    offenders.append(f"{path}:{node.lineno} torch.load without weights_only=True")
    assert not offenders, offenders


def test_module_hparams_reject_bad_max_nonfinite(tiny_sd3_path):
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        make_module(tiny_sd3_path, max_nonfinite_steps=0)
    assert copy.deepcopy(make_module(tiny_sd3_path)).hparams.max_nonfinite_steps == 3

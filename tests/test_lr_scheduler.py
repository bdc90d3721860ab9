"""``model.lr_scheduler``: stepped once per training step (skipped updates included), driving
the update, and restored exactly on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from test_module import PROMPTS, make_module, nan_on_first_backward, randomise_lora_b

from marble_pl.data import PromptDataModule
from marble_pl.module import MarbleModule

LR = 0.5


def linear_decay(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """lr_i = LR * (1 - 0.75 i / 4): 0.5, 0.40625, 0.3125, 0.21875, then 0.125."""
    return torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=0.25, total_iters=4
    )


def expected_lr(step: int) -> float:
    return LR * (1 - 0.75 * min(step, 4) / 4)


class Trace(Callback):
    """Per step: the lr the update used, the LoRA change, and the applied gradient."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.deltas: list[torch.Tensor] = []
        self.directions: list[torch.Tensor | None] = []

    @staticmethod
    def _flat(module: MarbleModule) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in module.lora_params])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self._before = self._flat(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.deltas.append(self._flat(pl_module) - self._before)
        direction = pl_module.last_step.direction
        self.directions.append(None if direction is None else direction.clone())


def module_with_schedule(path: Path) -> MarbleModule:
    module = make_module(
        path,
        gradient_space="parameters",
        optimizer=lambda p: torch.optim.SGD(p, lr=LR),
        lr_scheduler=linear_decay,
    )
    randomise_lora_b(module)
    return module


def fit_traced(module, steps, ckpt_dir=None, ckpt_path=None) -> Trace:
    trace = Trace()
    callbacks: list[Callback] = [trace]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1))
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    data = PromptDataModule(str(PROMPTS), batch_size=2, group_size=3, seed=0)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trace


def test_scheduler_steps_every_step_and_drives_the_update(tiny_sd3_path, monkeypatch):
    """Step 0's update is NaN and skipped; the schedule still advances, so step i uses lr_i,
    and each taken update is exactly ``-lr_i * d_i`` (plain SGD, no clipping)."""
    nan_on_first_backward(monkeypatch)
    module = module_with_schedule(tiny_sd3_path)
    trace = fit_traced(module, steps=4)
    assert module.counters["skipped_nonfinite"] == 1
    assert trace.lrs == pytest.approx([expected_lr(i) for i in range(4)], rel=1e-12)
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected_lr(4))
    assert torch.equal(trace.deltas[0], torch.zeros_like(trace.deltas[0]))  # skipped
    for lr, delta, d in zip(trace.lrs[1:], trace.deltas[1:], trace.directions[1:], strict=True):
        torch.testing.assert_close(delta, -lr * d, atol=1e-7, rtol=1e-5)


def test_scheduler_resumes_where_it_stopped(tmp_path, tiny_sd3_path):
    """4 steps in one go == 2 steps, then a resume from the checkpoint for 2 more: the same
    learning rates and bit-identical LoRA weights."""
    seed_everything(0)
    full = module_with_schedule(tiny_sd3_path)
    trace_full = fit_traced(full, 4)
    seed_everything(0)
    fit_traced(module_with_schedule(tiny_sd3_path), 2, ckpt_dir=tmp_path / "part")
    seed_everything(0)
    resumed = module_with_schedule(tiny_sd3_path)
    trace_b = fit_traced(resumed, 4, ckpt_path=tmp_path / "part" / "last.ckpt")
    assert trace_b.lrs == trace_full.lrs[2:]
    assert trace_full.lrs == pytest.approx([expected_lr(i) for i in range(4)], rel=1e-12)
    for a, b in zip(full.lora_params, resumed.lora_params, strict=True):
        assert torch.equal(a, b)

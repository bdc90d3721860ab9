"""Per-reward score distributions and one-glance charts of coefficients and cosines."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from marble_pl.errors import ConfigError

__all__ = ["RewardHistograms"]


class RewardHistograms(Callback):
    r"""Histograms of each reward's scores (``reward_hist/<reward>``) every ``every_n_steps``.

    At the start of training it also registers TensorBoard "custom scalars" charts that draw
    all ``lambda/*``, all ``lambda_ema/*``, all ``reward/*/mean`` and all ``cos/*`` on one
    chart each, so which reward dominates when is visible at a glance (CUSTOM SCALARS tab).
    Needs a ``TensorBoardLogger``; does nothing with other loggers.

    Args:
        every_n_steps: histogram period in training steps.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: marble_pl.callbacks.RewardHistograms
              init_args: {every_n_steps: 10}
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    @staticmethod
    def _writers(trainer: Trainer) -> list[Any]:
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        layout = {
            "MARBLE": {
                "coefficients (raw QP)": ["Multiline", [r"lambda/.*"]],
                "coefficients (applied, EMA)": ["Multiline", [r"lambda_ema/.*"]],
                "rewards": ["Multiline", [r"reward/.*/mean"]],
                "cosine with the update": ["Multiline", [r"cos/.*"]],
                "cosine with the weighted-sum update": ["Multiline", [r"cos_ws/.*"]],
            }
        }
        for writer in self._writers(trainer):
            writer.add_custom_scalars(layout)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        record = getattr(pl_module, "last_step", None)
        step = trainer.global_step
        if record is None or step % self.every_n_steps or not trainer.is_global_zero:
            return
        for writer in self._writers(trainer):
            for k, name in enumerate(pl_module.reward_names):
                values = record.rewards[:, k]
                writer.add_histogram(f"reward_hist/{name}", values[values.isfinite()], step)

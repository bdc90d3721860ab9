"""A callback that pretrains the digits pipeline on first use, before the module loads it."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from marble_pl.digits.pretrain import ensure_digits_sd3, settings_for

__all__ = ["BuildDigitsModel"]


class BuildDigitsModel(Callback):
    """Pretrain the digits pipeline at ``path`` in ``setup`` unless a complete one is there.

    Lightning runs the callbacks' ``setup`` before the module's ``setup``/``configure_model``,
    which then load ``path`` as any pipeline. ``path`` must equal
    ``model.pretrained_model_name_or_path``. Under ``torch.distributed`` global rank 0 builds
    while the others wait at a barrier.

    Args:
        path: the pipeline folder.
        preset: ``default`` (a few CPU minutes) or ``smoke`` (seconds, for CI).
        steps: transformer steps instead of the preset's.
        seed: pretrain seed instead of the preset's (0).
    """

    def __init__(
        self, path: str, preset: str = "default", steps: int | None = None, seed: int | None = None
    ) -> None:
        self.path = path
        self.settings = settings_for(preset, steps=steps, seed=seed)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> Any:
        """Build the pipeline (rank 0) before the module reads it."""
        if trainer.world_size == 1 or trainer.is_global_zero:
            ensure_digits_sd3(self.path, self.settings)
        if trainer.world_size > 1:
            trainer.strategy.barrier("marble_digits_sd3")

"""A progress bar that counts optimizer steps and shows each reward's mean under its own name."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

__all__ = ["MarbleProgressBar", "MarbleTQDMProgressBar", "default_progress_bar"]


def _short_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``reward/<name>/mean`` -> ``<name>``; drop ``v_num`` (the run folder says it)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "v_num":
            continue
        if key.startswith("reward/") and key.endswith("/mean"):
            key = key[len("reward/") : -len("/mean")]
        out[key] = value
    return out


def _counts_steps(trainer: Trainer) -> bool:
    """A ``max_steps`` run: the bar counts optimizer steps of the whole run, not one epoch's
    batches (after a resume those read ``12/3``: a batch index against an epoch's length)."""
    return trainer.max_steps is not None and trainer.max_steps > 0


def _step_description(trainer: Trainer, current_epoch: int) -> str:
    """``step 12/20`` for a ``max_steps`` run (Lightning's ``Epoch 1/-2`` reads as a bug)."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return f"step {trainer.global_step}/{trainer.max_steps}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return f"epoch {current_epoch + 1}/{trainer.max_epochs}"
    return f"epoch {current_epoch + 1}"


class MarbleProgressBar(RichProgressBar):
    """Lightning's rich bar with ``step N/max_steps`` and short reward names (``brightness``)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return _step_description(self.trainer, current_epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_steps(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self._show_steps(trainer)

    def _show_steps(self, trainer: Trainer) -> None:
        if self.train_progress_bar_id is None or self.progress is None:
            return
        counts = {"total": trainer.max_steps, "completed": trainer.global_step}
        self.progress.update(
            self.train_progress_bar_id,
            description=_step_description(trainer, trainer.current_epoch),
            **(counts if _counts_steps(trainer) else {}),
        )

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return _short_metrics(super().get_metrics(trainer, pl_module))


class MarbleTQDMProgressBar(TQDMProgressBar):
    """The same for tqdm (used when ``rich`` is not installed)."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self._show_steps(trainer)

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        if _counts_steps(trainer):
            self.train_progress_bar.reset(total=trainer.max_steps)
        self._show_steps(trainer)

    def _show_steps(self, trainer: Trainer) -> None:
        bar = self.train_progress_bar
        if _counts_steps(trainer):
            bar.total, bar.n = trainer.max_steps, trainer.global_step
        bar.set_description(_step_description(trainer, trainer.current_epoch), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return _short_metrics(super().get_metrics(trainer, pl_module))


def default_progress_bar() -> RichProgressBar | TQDMProgressBar:
    """The rich bar when ``rich`` is installed, else tqdm (as Lightning chooses its own)."""
    return MarbleProgressBar() if _RICH_AVAILABLE else MarbleTQDMProgressBar()

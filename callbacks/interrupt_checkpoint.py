"""A checkpoint of the run when training is interrupted (SIGTERM, SIGUSR1, Ctrl-C, a crash)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from marble_pl.errors import ConfigError

__all__ = ["InterruptCheckpoint"]


class InterruptCheckpoint(Callback):
    r"""On an interrupt, write ``<log_dir>/checkpoints/interrupted-step=<N>.ckpt`` beside the run.

    Unlike Lightning's ``OnExceptionCheckpoint`` it is never restored silently (a plain
    ``marble fit`` starts a new run; resume with ``--ckpt_path PATH`` or ``--ckpt_path last``),
    it lives with its own run, its name carries the step so a later interrupt never overwrites it
    with an earlier state, and it is never deleted before a newer interrupt checkpoint of the same
    run is written. Nothing is written when the failure happens during set-up (before the first
    training step) or when no step ran since the run started or resumed (the checkpoint it
    resumed from still holds that state). The file is written to ``.tmp`` and renamed, so a kill
    during the write never leaves a truncated checkpoint under the final name.

    Under DDP a ``SIGTERM`` stops every rank at the same step and they write together; any other
    exception is written by global rank 0 alone, without a collective call that a crashed rank
    would never join.

    Args:
        dirpath: where to write (default: ``<trainer.log_dir>/checkpoints``, the run's own folder).
        filename: file name prefix.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: marble_pl.callbacks.InterruptCheckpoint
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted") -> None:
        super().__init__()
        if not filename or "/" in filename:
            raise ConfigError(
                f"InterruptCheckpoint(filename=...) must be a plain file name prefix, got {filename!r}"
            )
        self.dirpath = dirpath
        self.filename = filename
        self.last_path: Path | None = None
        self._dir: Path | None = None
        self._start_step: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the folder on every rank (``trainer.log_dir`` is a collective under DDP)."""
        if self.dirpath is not None:
            self._dir = Path(self.dirpath)
            return
        log_dir = trainer.log_dir
        self._dir = (
            Path(log_dir if log_dir is not None else trainer.default_root_dir) / "checkpoints"
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Armed from here: a failure before the first step writes nothing."""
        self._start_step = trainer.global_step

    def path_for(self, step: int) -> Path:
        """The file of an interrupt at ``step``."""
        assert self._dir is not None, "InterruptCheckpoint.setup has not run"
        return self._dir / f"{self.filename}-step={step:06d}{self.FILE_EXTENSION}"

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        step = trainer.global_step
        if self._start_step is None or self._dir is None:
            rank_zero_info("InterruptCheckpoint: stopped during set-up; no checkpoint written")
            return
        if step <= self._start_step:
            rank_zero_info(
                f"InterruptCheckpoint: no step ran since step {self._start_step}; "
                "no checkpoint written"
            )
            return
        path = self.path_for(step)
        collective = trainer.world_size == 1 or isinstance(exception, SIGTERMException)
        if collective:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            if trainer.is_global_zero:
                self._write(trainer, checkpoint, path)
            trainer.strategy.barrier("InterruptCheckpoint")
        elif trainer.is_global_zero:
            self._write(trainer, trainer._checkpoint_connector.dump_checkpoint(False), path)
        self.last_path = path

    def _write(self, trainer: Trainer, checkpoint: dict[str, Any], path: Path) -> None:
        """Write to ``.tmp`` and rename; then drop this run's older interrupt checkpoints."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, tmp)
        os.replace(tmp, path)
        rank_zero_info(f"InterruptCheckpoint: checkpoint written to {path}")
        pattern = re.compile(
            rf"{re.escape(self.filename)}-step=(\d+){re.escape(self.FILE_EXTENSION)}"
        )
        for old in path.parent.iterdir():
            match = pattern.fullmatch(old.name)
            if match and int(match.group(1)) < int(checkpoint["global_step"]):
                old.unlink(missing_ok=True)  # superseded: a newer checkpoint now exists

"""Data-parallel collectives of a module's step: sums, means, broadcasts, DDP's ``no_sync``.

Each is the identity on one process (no trainer, or a world of one), so every unit that
reduces over ranks runs unchanged in a plain test.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule
from torch import Tensor

__all__ = ["Ranks"]


class Ranks:
    """The data-parallel ranks of ``module``'s trainer (read when called)."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module

    @property
    def world(self) -> int:
        """How many processes train (1 without a trainer)."""
        module = self.module
        return module.trainer.world_size if module._trainer is not None else 1

    def sum(self, x: Tensor) -> Tensor:
        """Sum over data-parallel ranks (identity on one process)."""
        if self.world == 1:
            return x
        return self.module.trainer.strategy.reduce(x, reduce_op="sum")

    def mean(self, x: Tensor) -> Tensor:
        """Mean over data-parallel ranks, as DDP averages gradients (identity on one process)."""
        if self.world == 1:
            return x
        return self.sum(x) / self.world

    def broadcast(self, weights: np.ndarray) -> np.ndarray:
        """Rank 0's coefficients on every rank, so all ranks apply the very same update."""
        if self.world == 1:
            return weights
        return np.asarray(self.module.trainer.strategy.broadcast(weights, src=0))

    def gather(self, x: Tensor) -> Tensor:
        """``[W, ...]``: every rank's ``x`` stacked (``x`` itself, unstacked, on one process)."""
        if self.world == 1:
            return x
        return self.module.trainer.strategy.all_gather(x)

    def no_sync_unless(self, last: bool) -> AbstractContextManager[Any]:
        """DDP's ``no_sync`` for all but the last micro-batch: gradients all-reduce once."""
        module = self.module
        model = getattr(module.trainer.strategy, "model", None) if module._trainer else None
        if last or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

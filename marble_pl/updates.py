"""Whether an update is applied: a NaN/inf, all-zero or no-reward gradient skips it.

A skipped update still counts as a step (``max_steps``, schedules and seeds stay aligned);
``max_nonfinite_steps`` non-finite updates in a row stop the run with an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from marble_pl.loss_scaling import grad_scaler, is_overflow

if TYPE_CHECKING:
    from marble_pl.module import MarbleModule

__all__ = ["UpdateGuard", "grad_norm", "trains_any_reward"]


def trains_any_reward(weights: np.ndarray, present: np.ndarray) -> bool:
    """Whether the update trains some reward: one with a nonzero coefficient has samples."""
    w = np.asarray(weights, dtype=np.float64)
    return bool(np.any((w != 0) & np.asarray(present, dtype=bool)))


def grad_norm(params: Sequence[nn.Parameter]) -> float:
    """Norm of the gradient about to be applied (identical on every rank after the sync)."""
    norms = [p.grad.detach().double().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


class UpdateGuard:
    """Decides, and counts in ``module.counters``, why an update is skipped."""

    def __init__(self, module: MarbleModule) -> None:
        self.module = module

    def skip_reason(self, norm: float, trains: bool = True) -> str | None:
        """``None`` to step, else why this update is skipped (counted in ``updates/skipped_*``).

        A non-finite gradient (NaN/inf loss) skips the step; ``max_nonfinite_steps`` of them in a
        row stop the run with an error, rather than silently training on nothing. An all-zero
        gradient (every reward constant within its groups, say) skips the step too, and so does
        one that trains no reward (``trains`` False: no reward with a coefficient has a sample,
        or none has a usable gradient; the KL term alone is not applied).
        """
        if is_overflow(norm, grad_scaler(self.module._trainer)):  # fp16: the scaler backs off
            self.module.counters["skipped_overflow"] = (
                self.module.counters.get("skipped_overflow", 0) + 1
            )
            return "overflow"
        if not math.isfinite(norm):
            self.module.counters["skipped_nonfinite"] += 1
            self.module.counters["nonfinite_streak"] += 1
            if self.module.counters["nonfinite_streak"] >= self.module.hparams.max_nonfinite_steps:
                raise FloatingPointError(
                    f"the update was NaN/inf in {self.module.counters['nonfinite_streak']} steps in a row "
                    f"(up to step {self.module.global_step}): lower the learning rate, check the rewards "
                    "for extreme values, or use `trainer.precision: 32-true` to rule out "
                    "overflow; `model.max_nonfinite_steps` sets how many are tolerated."
                )
            return "nonfinite"
        self.module.counters["nonfinite_streak"] = 0
        if norm == 0.0:
            self.module.counters["skipped_zero_grad"] += 1
            return "zero"
        if not trains:
            self.module.counters["skipped_no_reward"] += 1
            return "no_reward"
        return None

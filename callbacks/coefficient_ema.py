"""EMA of MARBLE's balancing coefficients, as a Lightning callback."""

from __future__ import annotations

from typing import Any

import numpy as np
from lightning.pytorch import Callback
from torch import Tensor

from marble_pl.balance import EMA, conflicts

__all__ = ["CoefficientEMA"]


class CoefficientEMA(Callback):
    r"""Smooths the QP's coefficients: ``lambda_bar = mu * lambda_bar + (1 - mu) * lambda*``.

    Single-batch Gram matrices are noisy; the update uses ``lambda_bar`` instead of ``lambda*``
    (ARCHITECTURE §2 step 7). The module asks this callback for ``lambda_bar`` in the middle of
    its training step; without the callback it applies the raw ``lambda*``. The EMA state is
    saved in Lightning checkpoints and restored on resume.

    The min-norm point ``lambda*`` never conflicts with a reward (``<g_k, d> >= ||d||^2``), but
    a smoothed ``lambda_bar`` can: on a batch whose gradients disagree strongly, the lagging
    average may push one reward backwards. With ``guard=True`` such a step applies ``lambda*``
    instead (checked exactly on the step's Gram, ``min_k (M lambda_bar)_k < 0``); the EMA state is
    updated as usual and the guarded steps are counted (``lambda/guarded``).

    Args:
        decay: ``mu`` in [0, 1); 0 applies the raw coefficients.
        bias_correction: start from zero and divide by ``1 - mu^t`` (True), or start from uniform
            weights ``1/K`` (False).
        guard: fall back to ``lambda*`` on steps where ``lambda_bar`` would conflict.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: marble_pl.callbacks.CoefficientEMA
              init_args: {decay: 0.9}
    """

    def __init__(
        self, decay: float = 0.9, bias_correction: bool = True, guard: bool = True
    ) -> None:
        self.ema = EMA(decay=decay, bias_correction=bias_correction)
        self.guard = guard
        self.guarded = 0

    @property
    def value(self) -> np.ndarray | None:
        """The current ``lambda_bar`` (None before the first step)."""
        return self.ema.value

    def update(self, weights: np.ndarray, gram: np.ndarray | Tensor | None = None) -> np.ndarray:
        """Fold in this step's ``lambda*``; return the coefficients to apply.

        That is ``lambda_bar``, or ``lambda*`` itself when ``guard`` is on, the step's Gram is
        given and ``lambda_bar`` would conflict with a reward.
        """
        smoothed = self.ema.update(weights)
        if self.guard and gram is not None and conflicts(gram, smoothed):
            self.guarded += 1
            return np.asarray(weights, dtype=np.float64)
        return smoothed

    def state_dict(self) -> dict[str, Any]:
        return {**self.ema.state_dict(), "guarded": self.guarded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the running average; the configured decay and bias correction win (resume
        with changed settings applies them)."""
        decay, bias_correction = self.ema.decay, self.ema.bias_correction
        self.ema.load_state_dict(state_dict)
        self.ema.decay, self.ema.bias_correction = decay, bias_correction
        self.guarded = int(state_dict.get("guarded", 0))

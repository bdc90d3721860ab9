"""EMA of MARBLE's balancing coefficients, as a Lightning callback."""

from __future__ import annotations

from typing import Any

import numpy as np
from lightning.pytorch import Callback

from marble_pl.balance import EMA

__all__ = ["CoefficientEMA"]


class CoefficientEMA(Callback):
    r"""Smooths the QP's coefficients: ``lambda_bar = mu * lambda_bar + (1 - mu) * lambda*``.

    Single-batch Gram matrices are noisy; the update uses ``lambda_bar`` instead of ``lambda*``
    (ARCHITECTURE §2 step 7). The module asks this callback for ``lambda_bar`` in the middle of
    its training step; without the callback it applies the raw ``lambda*``. The EMA state is
    saved in Lightning checkpoints and restored on resume.

    Args:
        decay: ``mu`` in [0, 1); 0 applies the raw coefficients.
        bias_correction: start from zero and divide by ``1 - mu^t`` (True), or start from uniform
            weights ``1/K`` (False).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: marble_pl.callbacks.CoefficientEMA
              init_args: {decay: 0.9}
    """

    def __init__(self, decay: float = 0.9, bias_correction: bool = True) -> None:
        self.ema = EMA(decay=decay, bias_correction=bias_correction)

    @property
    def value(self) -> np.ndarray | None:
        """The current ``lambda_bar`` (None before the first step)."""
        return self.ema.value

    def update(self, weights: np.ndarray) -> np.ndarray:
        """Fold in this step's ``lambda*`` and return ``lambda_bar`` for the update."""
        return self.ema.update(weights)

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict)

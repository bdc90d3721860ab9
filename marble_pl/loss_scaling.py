"""fp16 training with a GradScaler under manual optimisation (``trainer.precision: 16-mixed``).

The official MARBLE and DiffusionNFT recipes train with fp16 autocast on float32 weights and a
``GradScaler``. Lightning's ``MixedPrecision`` plugin does the scaler's work for a manual
optimisation loop only in part: ``manual_backward`` scales the loss, and ``optimizer.step()``
unscales, steps (skipping on inf/NaN) and updates the scale. What it leaves to the module:

* clipping happens before ``optimizer.step()``, on the still SCALED gradients, so the threshold
  is scaled too (:func:`scaled_clip`);
* an update the module skips (zero gradient, no reward trained) must still go through
  ``scaler.step`` (which needs gradients) without touching the weights, the optimizer state or
  the scale (:func:`skipped_update`);
* an inf/NaN gradient while the scale is > 1 is the scaler's overflow, not a diverged run
  (:func:`is_overflow`): the scaler skips that step and lowers its scale;
* gradients assigned to ``.grad`` from ``torch.autograd.grad`` (``gradient_space: parameters``
  or ``gramian``) bypass the loss scaling altogether: refused (:func:`check_loss_scaling`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from marble_pl.errors import ConfigError

__all__ = ["check_loss_scaling", "grad_scaler", "is_overflow", "scaled_clip", "skipped_update"]


def grad_scaler(trainer: Any) -> torch.amp.GradScaler | None:
    """The trainer's loss scaler (``precision: 16-mixed``), None for any other precision."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    scaler = getattr(plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None


def check_loss_scaling(
    scaler: torch.amp.GradScaler | None, gradient_space: str, weights_dtype: str
) -> None:
    """Refuse the settings fp16 loss scaling cannot serve, naming the fix."""
    if scaler is None:
        return
    if gradient_space != "output":
        raise ConfigError(
            f"trainer.precision 16-mixed cannot train with model.gradient_space "
            f"{gradient_space!r}: its per-reward gradients come from torch.autograd.grad, "
            "outside the loss scaling. Use model.gradient_space: output, or trainer.precision: "
            "bf16-mixed (no scaling needed)"
        )
    if weights_dtype != "float32":
        raise ConfigError(
            f"trainer.precision 16-mixed autocasts float32 weights to fp16 (the official "
            f"recipe); model.weights_dtype {weights_dtype!r} would be cast again and can "
            "overflow: set model.weights_dtype: float32, or use trainer.precision: bf16-mixed"
        )


def scaled_clip(clip: float, scaler: torch.amp.GradScaler | None) -> float:
    """Clip threshold for gradients still multiplied by the loss scale: ``clip * scale``."""
    return clip if scaler is None else clip * scaler.get_scale()


def is_overflow(norm: float, scaler: torch.amp.GradScaler | None) -> bool:
    """An inf/NaN gradient norm under a loss scale > 1: the scaler's overflow to back off from."""
    return scaler is not None and not math.isfinite(norm) and scaler.get_scale() > 1.0


@contextlib.contextmanager
def skipped_update(
    optimizer: Any, scaler: torch.amp.GradScaler | None, skip: str | None
) -> Iterator[None]:
    """Around ``optimizer.step()``: make a skipped update (``skip`` names why) a no-op.

    Without a scaler the gradients are dropped (torch optimizers leave parameters without
    ``.grad`` alone: weights AND state). With one, ``scaler.step`` needs gradients: they are set
    to NaN so the scaler skips the inner step, then the scale it lowered is put back, since
    the skip was ours, not an overflow. ``skip == "overflow"`` leaves the scaler to back off.
    """
    if skip is None or skip == "overflow":
        yield
        return
    if scaler is None:
        optimizer.zero_grad(set_to_none=True)
        yield
        return
    scale = scaler.get_scale()
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.full_like(p, math.nan)
    yield
    scaler.update(new_scale=scale)

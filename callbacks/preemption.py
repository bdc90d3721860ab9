"""Spot-instance pre-emption: more signals into Lightning's SIGTERM handling."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["PreemptionSignal"]


class PreemptionSignal(Callback):
    r"""Treats ``signals`` (``SIGUSR1`` by default) like ``SIGTERM``: finish the step, then stop.

    Lightning already handles ``SIGTERM`` (what cloud providers send before reclaiming a spot
    instance): it finishes the current training step and raises ``SIGTERMException``, and
    Lightning's ``OnExceptionCheckpoint`` callback then writes a checkpoint to resume from with
    ``--ckpt_path``. Many schedulers send ``SIGUSR1`` as the early warning instead; this callback
    re-sends it to the process as ``SIGTERM`` so both take the same, tested path.

    Args:
        signals: signal names to forward (``SIGUSR1``, ``SIGUSR2``, ``SIGINT``, ...).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: lightning.pytorch.callbacks.OnExceptionCheckpoint
              init_args: {dirpath: runs/interrupted}
            - class_path: marble_pl.callbacks.PreemptionSignal
    """

    def __init__(self, signals: Sequence[str] = ("SIGUSR1",)) -> None:
        self.signals = []
        for name in signals:
            sig = getattr(signal, str(name).upper(), None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"unknown signal {name!r}: use names like 'SIGUSR1' or 'SIGUSR2'")
            if sig == signal.SIGTERM:
                raise ValueError("SIGTERM is handled by Lightning itself; list other signals")
            self.signals.append(sig)
        self._previous: dict[signal.Signals, Any] = {}

    @staticmethod
    def _forward(signum: int, frame: FrameType | None) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._forward)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

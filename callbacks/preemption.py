"""Spot-instance pre-emption: more signals into Lightning's SIGTERM handling."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from types import FrameType
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from marble_pl.errors import ConfigError

__all__ = ["PreemptionSignal"]


class PreemptionSignal(Callback):
    r"""Treats ``signals`` (``SIGUSR1`` by default) like ``SIGTERM``: finish the step, then stop.

    Lightning already handles ``SIGTERM`` (what cloud providers send before reclaiming a spot
    instance): it finishes the current training step and raises ``SIGTERMException``, and
    ``InterruptCheckpoint`` then writes a checkpoint to resume from with ``--ckpt_path``. Many
    schedulers send ``SIGUSR1`` as the early warning instead; this callback re-sends it to the
    process as ``SIGTERM`` so both take the same, tested path. The signal received is kept in
    :attr:`received`, so ``marble`` exits with ``128 + that signal`` (138 for SIGUSR1).

    Under SLURM with Lightning's auto-requeue (``SLURMEnvironment(auto_requeue=True)``, the
    default when Lightning detects a SLURM job), the requeue signal (``SIGUSR1`` unless
    ``requeue_signal`` says otherwise) belongs to Lightning, which checkpoints and requeues the
    job on it: this callback leaves that signal alone and says so once.

    Args:
        signals: signal names to forward (``SIGUSR1``, ``SIGUSR2``, ``SIGINT``, ...).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: marble_pl.callbacks.InterruptCheckpoint
            - class_path: marble_pl.callbacks.PreemptionSignal
    """

    def __init__(self, signals: Sequence[str] = ("SIGUSR1",)) -> None:
        self.signals = []
        for name in signals:
            sig = getattr(signal, str(name).upper(), None)
            if not isinstance(sig, signal.Signals):
                raise ConfigError(f"unknown signal {name!r}: use names like 'SIGUSR1' or 'SIGUSR2'")
            if sig == signal.SIGTERM:
                raise ConfigError("SIGTERM is handled by Lightning itself; list other signals")
            self.signals.append(sig)
        self._previous: dict[signal.Signals, Any] = {}

    received: signal.Signals | None = None
    """The last signal forwarded in this process (``None``: none)."""

    @staticmethod
    def _forward(signum: int, frame: FrameType | None) -> None:
        PreemptionSignal.received = signal.Signals(signum)
        os.kill(os.getpid(), signal.SIGTERM)

    @staticmethod
    def lightning_signal(trainer: Trainer) -> signal.Signals | None:
        """The signal Lightning's SLURM auto-requeue handles in this job, if any."""
        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal:
            return signal.Signals(env.requeue_signal)
        return None

    def routed(self, trainer: Trainer) -> list[signal.Signals]:
        """The signals this callback forwards in ``trainer``'s environment."""
        taken = self.lightning_signal(trainer)
        return [sig for sig in self.signals if sig != taken]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        taken = self.lightning_signal(trainer)
        if taken is not None and taken in self.signals:
            rank_zero_info(
                f"PreemptionSignal: {taken.name} is Lightning's SLURM requeue signal; left to "
                "Lightning (checkpoint + requeue)"
            )
        PreemptionSignal.received = None
        for sig in self.routed(trainer):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._forward)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

"""The decay of the sampling policy ``v_old <- decay * v_old + (1 - decay) * v_theta``, by step.

DiffusionNFT (``scripts/train_nft_sd3.py``, ``return_decay``) does not use one decay from the
first step: it holds the decay at 0 for ``hold_steps`` steps (``v_old = v_theta``, on-policy),
then ramps it linearly, ``min(slope * (step - hold_steps), max_decay)``. Its presets
(``config/nft.py``), all reachable here with :class:`DecaySchedule`:

========================================  ==========  =======  ===========
DiffusionNFT setting                      hold_steps  slope    max_decay
========================================  ==========  =======  ===========
``decay_type=1``: the default, SD3.5      0           0.001    0.5
multi-reward, PickScore, HPSv2, GenEval
``decay_type=2``: OCR                     75          0.0075   0.999
``decay_type=0``: always on-policy        ``DecaySchedule.constant(0.0)``
========================================  ==========  =======  ===========

``step`` is the number of optimizer steps taken, counting the one just applied: DiffusionNFT
increments its ``global_step`` before it updates ``v_old``, so the first update uses
``decay(1)``. A plain number (``old_policy_decay: 0.5``) is a constant decay from step 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["DIFFUSIONNFT_DECAY", "DecaySchedule", "decay_schedule", "warmup_decay"]


def warmup_decay(step: int, decay: float) -> float:
    """``min((1 + step) / (10 + step), decay)``: an EMA that trusts its first values less (the
    warm-up DiffusionNFT's evaluation EMA of the trained weights uses)."""
    return min((1 + step) / (10 + step), decay)


@dataclass(frozen=True)
class DecaySchedule:
    """``0`` for ``step < hold_steps``, then ``min(start + slope * (step - hold_steps), max_decay)``.

    Pure and immutable: ``schedule(step)`` is the decay after optimizer step ``step``. ``start``
    (0 in DiffusionNFT) is the value the ramp begins from once the hold ends;
    :meth:`constant` is ``hold_steps=0, slope=0, start=max_decay``.
    """

    hold_steps: int = 0
    slope: float = 0.001
    max_decay: float = 0.5
    start: float = 0.0

    def __post_init__(self) -> None:
        problems = [
            (
                isinstance(self.hold_steps, bool)
                or not isinstance(self.hold_steps, int)
                or self.hold_steps < 0,
                f"hold_steps must be a whole number of steps >= 0, got {self.hold_steps!r}",
            ),
            (
                not (math.isfinite(self.slope) and self.slope >= 0),
                f"slope must be finite and >= 0 (decay gained per step), got {self.slope!r}",
            ),
            (
                not 0.0 <= self.max_decay <= 1.0,
                f"max_decay must be in [0, 1], got {self.max_decay!r}",
            ),
            (
                not 0.0 <= self.start <= self.max_decay,
                f"start must be in [0, max_decay={self.max_decay!r}], got {self.start!r}",
            ),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(message)

    @classmethod
    def constant(cls, value: float) -> DecaySchedule:
        """The same decay at every step (``old_policy_decay: 0.5``)."""
        value = float(value)
        return cls(hold_steps=0, slope=0.0, max_decay=value, start=value)

    @property
    def is_constant(self) -> bool:
        """Whether every step gets the same decay."""
        return self.start == self.max_decay and self.hold_steps == 0

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.hold_steps:
            return 0.0
        return float(min(self.start + self.slope * (step - self.hold_steps), self.max_decay))

    def as_plain(self) -> float | dict[str, float | int]:
        """A float (constant) or a dict of the fields: what checkpoints and YAML hold."""
        return float(self.max_decay) if self.is_constant else asdict(self)


DIFFUSIONNFT_DECAY = DecaySchedule(hold_steps=0, slope=0.001, max_decay=0.5)
"""DiffusionNFT's default (``decay_type=1``), used by its SD3.5 multi-reward config."""


def decay_schedule(spec: float | DecaySchedule | Mapping[str, Any]) -> DecaySchedule:
    """A :class:`DecaySchedule` from a number (constant), a schedule, or a dict of its fields.

    Raises ``ValueError`` naming the bad field or value.
    """
    if isinstance(spec, DecaySchedule):
        return spec
    if isinstance(spec, Mapping):
        known = {f.name for f in fields(DecaySchedule)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; a schedule has {sorted(known)}")
        return DecaySchedule(**dict(spec))
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise ValueError(
            f"expected a number in [0, 1] or {{hold_steps, slope, max_decay}}, got {spec!r}"
        )
    if not 0.0 <= spec <= 1.0:
        raise ValueError(f"a constant decay must be in [0, 1] (e.g. 0.5), got {spec!r}")
    return DecaySchedule.constant(spec)

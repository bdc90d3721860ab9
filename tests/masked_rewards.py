"""Test rewards that apply to some prompts only (``Reward.applicable``), NaN elsewhere.

A module of its own so that the DDP runs (``ddp_run.py``, a subprocess) can build them from a
``class_path`` spec: ``{"class_path": "masked_rewards.AppliesTo", "init_args": {...}}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from marble_pl.rewards import Reward
from marble_pl.rewards.builtin import luminance

STATS = ("brightness", "red", "contrast")


class AppliesTo(Reward):
    """A smooth image statistic where the prompt contains one of ``words``, NaN elsewhere.

    ``stat``: ``brightness`` (mean luminance), ``red`` (mean red channel) or ``contrast``
    (luminance std); three that pull the images in different directions.
    """

    def __init__(self, words: Sequence[str], stat: str = "brightness", name: str = "") -> None:
        super().__init__(name or None)
        if stat not in STATS:
            raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
        self.words, self.stat = list(words), stat

    def applicable(self, prompts: Sequence[str], metadata=None) -> Tensor:
        return torch.tensor([any(w in p for w in self.words) for p in prompts], dtype=torch.bool)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        x = images.float()
        if self.stat == "brightness":
            v = luminance(x).mean(dim=(1, 2))
        elif self.stat == "red":
            v = x[:, 0].mean(dim=(1, 2))
        else:
            v = luminance(x).flatten(1).std(dim=1, correction=0)
        keep = self.applicable(prompts).to(v.device)
        return torch.where(keep, v, torch.full_like(v, float("nan")))


def spec(name: str, words: Sequence[str], stat: str) -> dict:
    """The ``class_path`` spec of an :class:`AppliesTo` reward."""
    return {
        "class_path": "masked_rewards.AppliesTo",
        "init_args": {"words": list(words), "stat": stat, "name": name},
    }

"""Rewards of the digits task (:mod:`marble_pl.digits`): they mean something and disagree.

``digit_confidence`` (a classifier's probability of the prompted digit) and ``stroke`` (ink
amount, signed by the prompt's "thin"/"thick" style) are specialists: they apply only to prompts
naming a digit or a style, and score NaN elsewhere. ``symmetry`` and ``centredness`` apply to
every prompt and pull against legibility (few digits are mirror-symmetric). Registered when
this module is imported (not by ``marble_pl.rewards``: they only mean something on this task);
configs name them by ``class_path``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from marble_pl.digits.data import IMAGE_SIZE, digit_images, prompted_digit, prompted_style
from marble_pl.rewards.base import Metadata, Reward
from marble_pl.rewards.builtin import luminance
from marble_pl.rewards.registry import register_reward

__all__ = ["Centredness", "DigitConfidence", "Stroke", "Symmetry", "digit_classifier", "gray16"]


def gray16(images: Tensor) -> Tensor:
    """``[N, 3, H, W]`` images in [0, 1] as ``[N, 256]`` 16x16 luminance (the data's size)."""
    luma = luminance(images.float()).unsqueeze(1)
    if luma.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        luma = F.interpolate(luma, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return luma.flatten(1)


@functools.lru_cache(maxsize=2)
def digit_classifier(c: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(weight [10, 256], bias [10])`` of a logistic regression fitted on all of load_digits.

    scikit-learn's lbfgs solver from zero: deterministic. Cached: fitted once per process.
    """
    from sklearn.linear_model import LogisticRegression

    images, labels = digit_images()
    model = LogisticRegression(C=c, max_iter=2000).fit(images.flatten(1).numpy(), labels.numpy())
    weight = torch.as_tensor(model.coef_, dtype=torch.float32)
    return weight, torch.as_tensor(model.intercept_, dtype=torch.float32)


@register_reward("digit_confidence")
class DigitConfidence(Reward):
    """The classifier's probability of the prompted digit, in [0, 1]; NaN for prompts naming none."""

    def __init__(self, c: float = 1.0, name: str | None = None) -> None:
        super().__init__(name)
        weight, bias = digit_classifier(c)
        self.register_buffer("weight", weight.clone(), persistent=False)
        self.register_buffer("bias", bias.clone(), persistent=False)

    def applicable(self, prompts: Sequence[str], metadata: Metadata | None = None) -> Tensor:
        """Prompts that name a digit ("a handwritten 3")."""
        return torch.tensor([prompted_digit(p) is not None for p in prompts], dtype=torch.bool)

    def probabilities(self, images: Tensor) -> Tensor:
        """``[N, 10]`` class probabilities of the images."""
        logits = gray16(images) @ self.weight.T + self.bias
        return logits.softmax(dim=1)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Probability of each prompt's digit."""
        probs = self.probabilities(images)
        digits = [prompted_digit(p) for p in prompts]
        rows = torch.tensor([-1 if d is None else d for d in digits], device=probs.device)
        picked = probs.gather(1, rows.clamp_min(0).unsqueeze(1)).squeeze(1)
        return torch.where(rows >= 0, picked, torch.full_like(picked, float("nan")))


@register_reward("stroke")
class Stroke(Reward):
    """Ink amount (mean luminance) for "thick strokes", minus it for "thin"; NaN without a style."""

    def applicable(self, prompts: Sequence[str], metadata: Metadata | None = None) -> Tensor:
        """Prompts that ask for thin or thick strokes."""
        return torch.tensor([prompted_style(p) is not None for p in prompts], dtype=torch.bool)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Signed ink amount per image."""
        amount = luminance(images.float()).mean(dim=(1, 2))
        signs = [
            {"thick": 1.0, "thin": -1.0}.get(prompted_style(p) or "", float("nan")) for p in prompts
        ]
        return amount * torch.tensor(signs, device=amount.device)


@register_reward("symmetry")
class Symmetry(Reward):
    """Left-right mirror symmetry ``1 - mean |x - flip(x)|`` of the luminance, in [0, 1]."""

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """1 minus the mean absolute difference to the mirrored image."""
        luma = luminance(images.float())
        return 1.0 - (luma - luma.flip(-1)).abs().mean(dim=(1, 2))


@register_reward("centredness")
class Centredness(Reward):
    """1 minus the ink centroid's distance to the image centre over the half-diagonal, in [0, 1].

    A blank image has no centroid and scores 0.
    """

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Ink-weighted centroid distance to the centre, as a score."""
        luma = luminance(images.float())
        h, w = luma.shape[-2:]
        ys = torch.linspace(-1.0, 1.0, h, device=luma.device).view(1, h, 1)
        xs = torch.linspace(-1.0, 1.0, w, device=luma.device).view(1, 1, w)
        mass = luma.sum(dim=(1, 2))
        cy = (luma * ys).sum(dim=(1, 2)) / mass.clamp_min(1e-8)
        cx = (luma * xs).sum(dim=(1, 2)) / mass.clamp_min(1e-8)
        score = 1.0 - torch.sqrt(cx**2 + cy**2) / 2**0.5
        return torch.where(mass > 1e-6, score, torch.zeros_like(score))

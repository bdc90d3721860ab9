"""scikit-learn's handwritten digits as a text-to-image data set: images, stroke styles, prompts.

The 1,797 8x8 digits of ``sklearn.datasets.load_digits`` (ships inside the package, no download),
upscaled bilinearly to 16x16, white ink on black, with prompts such as "a handwritten 3, thick
strokes": the style is the image's ink amount, thin or thick within its digit's lower or upper
third.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DIGIT_PATTERN",
    "IMAGE_SIZE",
    "STYLE_PATTERN",
    "STYLES",
    "digit_images",
    "ink",
    "prompt_for",
    "prompted_digit",
    "prompted_style",
    "stroke_styles",
    "training_prompts",
]

IMAGE_SIZE = 16
STYLES = ("thin", "thick")
DIGIT_PATTERN = re.compile(r"\bhandwritten ([0-9])\b")
STYLE_PATTERN = re.compile(r"\b(thin|thick) strokes\b")


def digit_images(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """``(images [1797, 1, size, size] in [0, 1], labels [1797])``: load_digits, upscaled."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0), torch.as_tensor(data.target, dtype=torch.long)


def ink(images: Tensor) -> Tensor:
    """Ink amount: the mean intensity of each ``[N, C, H, W]`` image (white ink on black)."""
    return images.float().mean(dim=(1, 2, 3))


def stroke_styles(images: Tensor, labels: Tensor) -> list[str | None]:
    """Per image ``"thin"``, ``"thick"`` or None: its ink in its digit's lower, upper or middle third."""
    amount = ink(images)
    styles: list[str | None] = [None] * len(labels)
    for digit in labels.unique().tolist():
        idx = (labels == digit).nonzero().flatten()
        low, high = torch.quantile(amount[idx], torch.tensor([1 / 3, 2 / 3])).tolist()
        for i in idx.tolist():
            a = amount[i].item()
            styles[i] = "thin" if a < low else "thick" if a > high else None
    return styles


def prompt_for(digit: int | None, style: str | None) -> str:
    """The prompt of a digit (None: any digit) and an optional stroke style."""
    subject = "a handwritten digit" if digit is None else f"a handwritten {digit}"
    return subject if style is None else f"{subject}, {style} strokes"


def training_prompts(
    labels: Tensor, styles: Sequence[str | None], generator: torch.Generator
) -> list[str]:
    """A prompt per image: its digit (dropped 20 % of the time), its style half the time it has one."""
    drop_digit = torch.rand(len(labels), generator=generator) < 0.2
    keep_style = torch.rand(len(labels), generator=generator) < 0.5
    return [
        prompt_for(None if drop else int(d), s if keep else None)
        for d, s, drop, keep in zip(
            labels.tolist(), styles, drop_digit.tolist(), keep_style.tolist(), strict=True
        )
    ]


def prompted_digit(prompt: str) -> int | None:
    """The digit a prompt asks for ("a handwritten 3" -> 3), None when it names none."""
    match = DIGIT_PATTERN.search(prompt)
    return int(match.group(1)) if match else None


def prompted_style(prompt: str) -> str | None:
    """The stroke style a prompt asks for ("thin" / "thick"), None when it names none."""
    match = STYLE_PATTERN.search(prompt)
    return match.group(1) if match else None

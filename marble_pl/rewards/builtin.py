"""Cheap built-in rewards that need no weights and pull images in conflicting directions."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from marble_pl.rewards.base import Reward
from marble_pl.rewards.registry import register_reward

__all__ = ["Brightness", "Compressibility", "Contrast", "Saturation", "luminance"]

_REC601 = (0.299, 0.587, 0.114)


def luminance(images: Tensor) -> Tensor:
    """Rec. 601 luma `0.299 R + 0.587 G + 0.114 B` of [N,3,H,W] images, shape [N,H,W]."""
    weights = images.new_tensor(_REC601).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1)


@register_reward("brightness")
class Brightness(Reward):
    """Mean Rec. 601 luminance of the image, in [0, 1].

    Pulls images towards white (all-white scores 1, all-black 0); conflicts with saturation and
    contrast.
    """

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Mean luminance per image."""
        return luminance(images.float()).mean(dim=(1, 2))


@register_reward("saturation")
class Saturation(Reward):
    """Mean HSV saturation `(max - min) / max` over pixels, in [0, 1] (0 where max is ~0).

    Pulls images towards vivid pure colours (pure red scores 1, any grey 0); conflicts with
    brightness, whose optimum (white) has no saturation.
    """

    def __init__(self, eps: float = 1e-6, name: str | None = None) -> None:
        super().__init__(name)
        if eps <= 0:
            raise ValueError(f"saturation: eps must be > 0, got {eps}")
        self.eps = eps

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-pixel (max - min) / max over RGB, averaged per image."""
        images = images.float()
        cmax = images.amax(dim=1)
        cmin = images.amin(dim=1)
        sat = torch.where(cmax > self.eps, (cmax - cmin) / cmax.clamp_min(self.eps), 0.0)
        return sat.mean(dim=(1, 2))


@register_reward("contrast")
class Contrast(Reward):
    """Standard deviation of luminance over the pixels of each image, in [0, 0.5].

    Pulls images towards hard black-and-white structure (a flat image scores 0); conflicts with
    brightness (white is flat) and with compressibility (detail costs bytes).
    """

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Population std of luminance per image."""
        luma = luminance(images.float()).flatten(1)
        return luma.std(dim=1, correction=0)


@register_reward("compressibility")
class Compressibility(Reward):
    """DDPO's compressibility: minus the JPEG size in kB (1000 bytes) at `quality`, in (-inf, 0].

    Pulls images towards flat, smooth, detail-free content; conflicts with contrast and saturation
    patterns. Encodes uint8 images with PIL on the CPU, one image at a time.
    """

    def __init__(self, quality: int = 95, name: str | None = None) -> None:
        super().__init__(name)
        if not 1 <= quality <= 100:
            raise ValueError(f"compressibility: quality must be in [1, 100], got {quality}")
        self.quality = quality

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Negative JPEG size in kB per image, as in DDPO's `jpeg_compressibility`."""
        pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        sizes = [self._jpeg_bytes(image) / 1000.0 for image in pixels]
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)

    def _jpeg_bytes(self, image: np.ndarray) -> int:
        """Size in bytes of one HWC uint8 image saved as JPEG."""
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=self.quality)
        return buffer.tell()

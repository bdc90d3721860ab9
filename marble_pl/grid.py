"""Image grids of samples (rows: prompts, columns: seeds), as tensors and PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["image_grid", "save_png", "upscale_to"]


def upscale_to(images: Tensor, min_size: int) -> Tensor:
    """``[N, C, H, W]`` images enlarged by the smallest whole factor that makes their shorter
    side at least ``min_size`` pixels, nearest neighbour (each pixel a block: nothing invented).
    Images already that large, or ``min_size`` 0, come back as they are."""
    factor = math.ceil(min_size / min(images.shape[-2:])) if min_size > 0 else 1
    if factor <= 1:
        return images
    return F.interpolate(images, scale_factor=factor, mode="nearest")


def image_grid(
    images: Tensor, ncol: int, padding: int = 2, pad_value: float = 1.0, min_cell_size: int = 0
) -> Tensor:
    """Tile ``[N, 3, H, W]`` images in [0, 1] into one ``[3, H', W']`` image, ``ncol`` per row;
    images smaller than ``min_cell_size`` pixels are enlarged first (:func:`upscale_to`)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if ncol < 1:
        raise ValueError(f"ncol must be >= 1, got {ncol}")
    if min_cell_size < 0:
        raise ValueError(f"min_cell_size must be >= 0, got {min_cell_size}")
    images = upscale_to(images, min_cell_size)
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    grid = torch.full(
        (c, nrow * (h + padding) + padding, ncol * (w + padding) + padding),
        pad_value,
        dtype=torch.float32,
    )
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        row, col = divmod(i, ncol)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = img
    return grid


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a ``[3, H, W]`` image in [0, 1] as an 8-bit PNG (deterministic bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")
    return path

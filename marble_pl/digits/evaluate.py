"""Sample a saved digits pipeline with diffusers' own StableDiffusion3Pipeline and score it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from marble_pl.digits.data import IMAGE_SIZE, prompt_for
from marble_pl.digits.pipeline import T5_TOKENS
from marble_pl.grid import image_grid, save_png
from marble_pl.rewards.digits import DigitConfidence

__all__ = ["evaluate_pipeline", "sample"]


@torch.no_grad()
def sample(
    pipe: StableDiffusion3Pipeline, prompts: list[str], *, seed: int = 0, steps: int = 10
) -> torch.Tensor:
    """``[N, 3, 16, 16]`` images in [0, 1] for ``prompts`` (Euler, no CFG, one generator)."""
    out = pipe(
        prompt=prompts,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        num_inference_steps=steps,
        guidance_scale=1.0,
        max_sequence_length=T5_TOKENS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.images.float().clamp(0, 1)


def evaluate_pipeline(
    path: str | os.PathLike[str], *, images: int = 200, grid: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """The share of samples of "a handwritten d" that the classifier reads as d; a grid PNG.

    The grid has one row per digit and 8 samples per row.
    """
    pipe = StableDiffusion3Pipeline.from_pretrained(
        Path(path), text_encoder_3=None, tokenizer_3=None
    )
    pipe.set_progress_bar_config(disable=True)
    digits = [i % 10 for i in range(images)]
    imgs = sample(pipe, [prompt_for(d, None) for d in digits], seed=seed)
    probs = DigitConfidence().probabilities(imgs)
    accuracy = (probs.argmax(dim=1) == torch.tensor(digits)).float().mean().item()
    if grid is not None:
        rows = [prompt_for(d, None) for d in range(10) for _ in range(8)]
        save_png(image_grid(sample(pipe, rows, seed=seed + 1), ncol=8), grid)
    return {"digit_accuracy": round(accuracy, 4), "eval_images": images}

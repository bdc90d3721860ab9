"""Which timesteps each rollout image is trained at (DiffusionNFT trains one image at many).

Per image, ``T`` timesteps are drawn, each later paired with fresh noise: from the sampler's own
shifted schedule (``sampler``, DiffusionNFT's choice: ``T`` distinct entries of the rollout's
sigmas, so a shift of 3 gives a mean ``t`` near 0.66 as in SD3.5) or ``U(t_min, t_max)``
(``uniform``). ``T`` is a count (an ``int``) or a fraction of the sampler's steps (a ``float`` in
(0, 1], floored as DiffusionNFT's ``int(timestep_fraction * num_steps)``: its 0.99 of 10 steps
is 9 per image, each a random subset of the schedule per image).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from marble_pl.errors import ConfigError

__all__ = ["TimestepSampling", "check_timesteps", "draw_timesteps", "timesteps_per_image_count"]

TimestepSampling = Literal["sampler", "uniform"]


def timesteps_per_image_count(spec: int | float, num_inference_steps: int) -> int:
    """``T``: ``spec`` itself when an ``int``, else ``floor(spec * num_inference_steps)`` (>= 1)."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise ConfigError(f"model.timesteps_per_image must be an int or a float, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ConfigError(f"model.timesteps_per_image must be >= 1 (a count), got {spec}")
        return spec
    if not 0.0 < spec <= 1.0:
        raise ConfigError(
            "model.timesteps_per_image as a float is a fraction of model.num_inference_steps "
            f"and must be in (0, 1] (e.g. 0.9), got {spec}"
        )
    return max(1, int(spec * num_inference_steps + 1e-9))  # 1e-9: 0.3 * 10 is 3, not 2.99...


def check_timesteps(spec: int | float, sampling: str, num_inference_steps: int) -> int:
    """Validate the settings (before any model loads) and return ``T``."""
    if sampling not in ("sampler", "uniform"):
        raise ConfigError(
            f"model.timestep_sampling must be 'sampler' or 'uniform', got {sampling!r}"
        )
    count = timesteps_per_image_count(spec, num_inference_steps)
    if sampling == "sampler" and count > num_inference_steps:
        raise ConfigError(
            f"model.timesteps_per_image={spec} asks for {count} distinct sampler timesteps but "
            f"the sampler has model.num_inference_steps={num_inference_steps}: use at most "
            f"{num_inference_steps}, or timestep_sampling: uniform"
        )
    return count


def draw_timesteps(
    generator: torch.Generator,
    count: int,
    sampling: TimestepSampling,
    sigmas: Tensor,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> Tensor:
    """``[count]`` training timesteps of one image, from ``generator`` alone (reproducible)."""
    if sampling == "sampler":
        return sigmas[torch.randperm(sigmas.numel(), generator=generator)[:count]]
    return t_min + (t_max - t_min) * torch.rand(count, generator=generator)

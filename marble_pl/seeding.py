"""Per-sample random generators: a sample's draws depend on its GLOBAL index, not on the split.

Each rollout sample gets CPU generators seeded by ``(seed, step, stream, global index)``, so its
noise, timesteps and rollout do not depend on how the global batch is split over data-parallel
ranks, on the rollout chunking, nor on what ran before (exact resume). Validation prompts get
``(seed, prompt index)`` only: the same noise at every validation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["per_sample", "step_generators", "validation_generators"]


def step_generators(seed: int, step: int, stream: int, start: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample ``start .. start + n - 1`` of step ``step``'s ``stream``."""
    base = (seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**31)
    return [
        torch.Generator(device="cpu").manual_seed(base * 2**31 + i) for i in range(start, start + n)
    ]


def per_sample(
    generators: list[torch.Generator],
    draw: Callable[[torch.Generator], Tensor],
    device: torch.device,
) -> Tensor:
    """``draw(g_i)`` stacked over the samples' generators, on ``device``."""
    return torch.stack([draw(gen) for gen in generators]).to(device)


def validation_generators(seed: int, indices: Iterable[int | Tensor]) -> list[torch.Generator]:
    """One CPU generator per validation prompt, seeded by ``(seed, prompt index)`` only."""
    base = (seed * 1_000_003 + 7919) % (2**31)
    return [torch.Generator(device="cpu").manual_seed(base * 2**31 + int(i)) for i in indices]

"""Per-sample random generators: a sample's draws depend on its GLOBAL index, not on the split.

Each rollout sample gets CPU generators seeded by ``(seed, step, stream, global index)``, so its
noise, timesteps and rollout do not depend on how the global batch is split over data-parallel
ranks, on the rollout chunking, nor on what ran before (exact resume). Validation prompts get
``(seed, prompt index)`` only: the same noise at every validation.

torch's CPU generator (mt19937) keeps only the LOW 32 bits of ``manual_seed``'s argument, so
the parts are hashed (SplitMix64) into a seed whose every bit depends on every part: the old
``base * 2**31 + i`` left the step out of those 32 bits, and every step of one parity drew the
same noise (and validation reused training noise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["mix_seed", "per_sample", "step_generators", "validation_generators"]

_MASK64 = (1 << 64) - 1
_TRAIN, _VALIDATION = 0, 1  # domains: no validation seed equals a training one


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integer ``parts``, each folded in by a SplitMix64 round (every output
    bit depends on every part)."""
    h = 0
    for part in parts:
        x = ((h ^ (int(part) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = x ^ (x >> 31)
    return h


def step_generators(seed: int, step: int, stream: int, start: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample ``start .. start + n - 1`` of step ``step``'s ``stream``."""
    return [
        torch.Generator(device="cpu").manual_seed(mix_seed(_TRAIN, seed, step, stream, i))
        for i in range(start, start + n)
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
    return [
        torch.Generator(device="cpu").manual_seed(mix_seed(_VALIDATION, seed, int(i)))
        for i in indices
    ]

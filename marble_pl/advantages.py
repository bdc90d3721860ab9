"""Independent per-reward advantage estimators (ARCHITECTURE §2 step 3).

Each reward column gets its own group-normalised advantage, so a sample that is a specialist for
one reward keeps its full signal for that reward instead of being diluted by a weighted sum.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

StdMode = Literal["group", "global"]

__all__ = ["group_advantages", "optimality"]


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    eps: float = 1e-4,
    std: StdMode = "group",
) -> Tensor:
    """Per-reward advantages ``A[:, k] = (R[:, k] - mean_group) / (std + eps)``.

    ``rewards`` is ``[N, K]`` (or ``[N]``, treated as ``K = 1``), ``group_ids`` is ``[N]`` and
    marks which rollouts share a prompt. ``std="group"`` divides by the standard deviation of the
    group (DiffusionNFT / GRPO), ``std="global"`` by the standard deviation of the whole batch
    (per reward). Standard deviations are the population ones (``unbiased=False``).

    Edge cases (documented behaviour, not errors): a group of size 1 has advantage 0 (there is no
    peer to compare with); a group whose rewards are all equal has advantage 0 (zero numerator).
    Both therefore map to ``r = 0.5`` in :func:`optimality`, i.e. no push either way.
    """
    squeeze = rewards.ndim == 1
    if squeeze:
        rewards = rewards.unsqueeze(1)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N] or [N, K], got shape {tuple(rewards.shape)}")
    if group_ids.ndim != 1 or group_ids.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"group_ids must be [N] with N={rewards.shape[0]} to match rewards, "
            f"got shape {tuple(group_ids.shape)}"
        )
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")

    rewards = rewards.to(torch.float32) if not rewards.is_floating_point() else rewards
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.shape[0]
    k = rewards.shape[1]
    index = inverse.unsqueeze(1).expand(-1, k)
    sums = torch.zeros(n_groups, k, dtype=rewards.dtype, device=rewards.device)
    sums.scatter_add_(0, index, rewards)
    counts_f = counts.to(rewards.dtype).unsqueeze(1)
    mean = (sums / counts_f)[inverse]
    centred = rewards - mean

    if std == "group":
        sq = torch.zeros_like(sums).scatter_add_(0, index, centred.square())
        sigma = (sq / counts_f).sqrt()[inverse]
    else:
        sigma = rewards.std(dim=0, unbiased=False, keepdim=True).expand_as(rewards)

    adv = centred / (sigma + eps)
    singleton = (counts == 1)[inverse].unsqueeze(1)
    adv = torch.where(singleton | (centred == 0), torch.zeros_like(adv), adv)
    return adv.squeeze(1) if squeeze else adv


def optimality(advantages: Tensor, a_max: float) -> Tensor:
    """Optimality probability ``r = 0.5 + 0.5 * clip(A, -a_max, a_max) / a_max`` in ``[0, 1]``.

    This is DiffusionNFT's mapping (``adv_clip_max``): ``r = 1`` pulls the policy fully towards the
    positive velocity ``v+``, ``r = 0`` towards the implicit negative ``v-``, ``r = 0.5`` is neutral.
    """
    if not a_max > 0:
        raise ValueError(f"a_max must be > 0 (DiffusionNFT's adv_clip_max, e.g. 5.0), got {a_max}")
    return 0.5 + 0.5 * advantages.clamp(-a_max, a_max) / a_max

"""Independent per-reward advantage estimators (ARCHITECTURE §2 step 3).

Each reward column gets its own group-normalised advantage, so a sample that is a specialist for
one reward keeps its full signal for that reward instead of being diluted by a weighted sum.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

StdMode = Literal["group", "global"]

__all__ = ["batch_moments", "group_advantages", "optimality", "pooled_std"]


def batch_moments(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[3, K]`` float64: the count, mean and sum of squared deviations of each reward column.

    One rank's share of a global standard deviation: stack every rank's moments (an all-gather of
    this small, fixed-shape tensor) and :func:`pooled_std` gives the standard deviation of the
    concatenated batch, exactly, whatever each rank's batch size (Chan et al.'s pairwise update).
    ``rewards`` is ``[N, K]`` or ``[N]`` (``K = 1``). ``mask`` (bool, the same shape) keeps only
    the samples a reward applies to: a column's moments are those of its kept values (count 0,
    mean 0 when none is kept).
    """
    x = rewards.detach().to(torch.float64)
    x = x.unsqueeze(1) if x.ndim == 1 else x
    if x.ndim != 2:
        raise ValueError(f"rewards must be [N] or [N, K], got shape {tuple(rewards.shape)}")
    if mask is None:
        n = x.shape[0]
        mean = x.mean(0) if n else x.new_zeros(x.shape[1])
        m2 = (x - mean).square().sum(0)
        return torch.stack([torch.full_like(mean, float(n)), mean, m2])
    keep = _as_mask(mask, x)
    count = keep.sum(0).to(torch.float64)
    x = torch.where(keep, x, torch.zeros_like(x))  # NaN where not applicable must not leak
    mean = x.sum(0) / count.clamp_min(1.0)
    m2 = torch.where(keep, (x - mean).square(), torch.zeros_like(x)).sum(0)
    return torch.stack([count, mean, m2])


def _as_mask(mask: Tensor, like: Tensor) -> Tensor:
    """``mask`` as a bool tensor shaped like the ``[N, K]`` ``like`` (an ``[N]`` mask: K = 1)."""
    keep = mask.to(device=like.device, dtype=torch.bool)
    keep = keep.unsqueeze(1) if keep.ndim == 1 else keep
    if keep.shape != like.shape:
        raise ValueError(
            f"mask must have the rewards' shape {tuple(like.shape)}, got {tuple(mask.shape)}"
        )
    return keep


def pooled_std(moments: Tensor, allow_empty: bool = False) -> Tensor:
    """``[K]``: the population standard deviation of the union of the batches whose
    :func:`batch_moments` are stacked in ``moments`` (``[R, 3, K]``, or ``[3, K]`` for one).

    A column with no value in any batch is an error, unless ``allow_empty`` (a reward that
    applies to no sample of the step): its standard deviation is then 0.
    """
    if moments.ndim == 2:
        moments = moments.unsqueeze(0)
    if moments.ndim != 3 or moments.shape[1] != 3:
        raise ValueError(f"moments must be [R, 3, K] or [3, K], got {tuple(moments.shape)}")
    n, mean, m2 = moments.to(torch.float64).unbind(1)  # each [R, K]
    total = n.sum(0)
    if bool((total <= 0).any()) and not allow_empty:
        raise ValueError("pooled_std: the batches hold no rewards")
    safe = total.clamp_min(1.0)
    grand = (n * mean).sum(0) / safe
    var = (m2 + n * (mean - grand).square()).sum(0) / safe
    return torch.where(total > 0, var.sqrt(), torch.zeros_like(var))


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    eps: float = 1e-4,
    std: StdMode = "global",
    global_std: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-reward advantages ``A[:, k] = (R[:, k] - mean_group) / (std + eps)``.

    ``rewards`` is ``[N, K]`` (or ``[N]``, treated as ``K = 1``), ``group_ids`` is ``[N]`` and
    marks which rollouts share a prompt. The mean is always the group's (the prompt's). The
    standard deviation, per reward, is

    * ``std="global"`` (the default): that of the whole batch, all groups together. This is
      DiffusionNFT's default (``config.sample.global_std = True`` in its ``config/base.py``; its
      ``PerPromptStatTracker`` in ``flow_grpo/stat_tracking.py`` divides the per-prompt centred
      rewards by ``np.std`` of all the rewards gathered from every GPU, ``+ 1e-4``). Pass
      ``global_std`` (``[K]``, e.g. :func:`pooled_std` of every data-parallel rank's
      :func:`batch_moments`) to use the batch of all ranks; without it, this ``rewards`` is the
      batch.
    * ``std="group"``: that of the group (GRPO's per-group normalisation; DiffusionNFT's option
      ``global_std = False``). A group whose rewards barely differ gets its tiny differences
      blown up to the size of a well-separated group's.

    Standard deviations are the population ones (``unbiased=False``, as ``np.std``).

    ``mask`` (bool, the rewards' shape) marks the samples each reward applies to (a specialist
    reward such as OCR scores some prompts only): the group means and both standard deviations
    use those samples only (pass ``global_std`` computed with the same mask), and a sample
    outside the mask gets advantage 0 for that reward, whatever its value (NaN included): as the
    paper authors' code, which gives not-applicable samples advantage 0.

    Edge cases (documented behaviour, not errors): a group of size 1 has advantage 0 (there is no
    peer to compare with); a group whose rewards are all equal has advantage 0 (zero numerator).
    Both therefore map to ``r = 0.5`` in :func:`optimality`, i.e. no push either way. With a
    mask, "size" counts the group's samples the reward applies to.
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
    if global_std is not None and std != "global":
        raise ValueError(f"global_std is only used with std='global', got std={std!r}")
    if global_std is not None and global_std.numel() != rewards.shape[1]:
        raise ValueError(
            f"global_std must hold one value per reward ({rewards.shape[1]}), "
            f"got shape {tuple(global_std.shape)}"
        )

    rewards = rewards.to(torch.float32) if not rewards.is_floating_point() else rewards
    keep = None if mask is None else _as_mask(mask, rewards)
    if keep is not None:
        rewards = torch.where(keep, rewards, torch.zeros_like(rewards))
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.shape[0]
    k = rewards.shape[1]
    index = inverse.unsqueeze(1).expand(-1, k)
    sums = torch.zeros(n_groups, k, dtype=rewards.dtype, device=rewards.device)
    sums.scatter_add_(0, index, rewards)
    if keep is None:
        counts_f = counts.to(rewards.dtype).unsqueeze(1)
    else:  # per reward: the group's applicable samples
        counts_f = torch.zeros_like(sums).scatter_add_(0, index, keep.to(rewards.dtype))
    mean = (sums / counts_f.clamp_min(1))[inverse]
    centred = rewards - mean
    if keep is not None:
        centred = torch.where(keep, centred, torch.zeros_like(centred))

    if std == "group":
        sq = torch.zeros_like(sums).scatter_add_(0, index, centred.square())
        sigma = (sq / counts_f.clamp_min(1)).sqrt()[inverse]
    else:
        if global_std is None:
            global_std = pooled_std(batch_moments(rewards, keep), allow_empty=keep is not None)
        sigma = global_std.reshape(1, k).to(rewards.device, rewards.dtype).expand_as(rewards)

    adv = centred / (sigma + eps)
    singleton = (counts_f <= 1)[inverse]
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

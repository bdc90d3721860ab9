"""Scoring a batch: the K rewards, where each applies, and their advantage estimators.

:class:`Scorer` scores the rollouts, applies the non-finite policy, and turns the scores into the
optimality probabilities ``r`` the loss trains on: per reward (MARBLE), or one estimator on
``R @ w`` (the baselines), each reward over the samples it applies to, with the standard
deviation of the global batch (every data-parallel rank's). The math is in
:mod:`marble_pl.advantages`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from marble_pl.advantages import batch_moments, group_advantages, optimality, pooled_std
from marble_pl.errors import MarbleUserError
from marble_pl.gradients import masked_mean_weights
from marble_pl.objective import LossMask
from marble_pl.rewards.base import Metadata

if TYPE_CHECKING:
    from marble_pl.module import MarbleModule
    from marble_pl.monitors import ScoredBatch

__all__ = ["NonFiniteRewardError", "Scorer"]


class NonFiniteRewardError(MarbleUserError, FloatingPointError):
    """A reward model returned NaN/inf; the message names the reward and the fix."""


class Scorer:
    """The rewards of ``module`` on a batch, and their estimators (``module.hparams`` live)."""

    def __init__(self, module: MarbleModule) -> None:
        self.module = module

    @torch.no_grad()
    def score(
        self, images: Tensor, prompts: Sequence[str], metadata: Metadata | None = None
    ) -> Tensor:
        """``R [N, K]``: every reward on every image (float32); ``metadata``: one dict per image
        (the prompt's source and fields), passed to the rewards that take it."""
        return torch.stack(
            [rw(images, prompts, metadata=metadata).float() for rw in self.module.rewards], dim=1
        )

    def applicability(self, prompts: Sequence[str], metadata: Metadata | None = None) -> Tensor:
        """``[N, K]`` bool: the samples each reward scores (:meth:`Reward.applicable`).

        Decided from the prompts and their metadata alone (OCR: quoted text; GenEval: an
        ``include`` field), so it is known before scoring and agrees on every rank. A reward
        does not apply elsewhere: its score there is ignored (NaN by the official convention),
        which is neither an error nor a drop.
        """
        n, cols = len(prompts), []
        for name, reward in zip(self.module.reward_names, self.module.rewards, strict=True):
            col = torch.as_tensor(reward.applicable(prompts, metadata))
            if col.shape != (n,):
                raise ValueError(
                    f"reward {name!r}: applicable() returned shape {tuple(col.shape)} for {n} "
                    f"prompts: return a bool tensor of shape [{n}], one entry per prompt"
                )
            cols.append(col.to(torch.bool).cpu())
        return torch.stack(cols, dim=1).to(self.module.device)

    def estimators(
        self, rewards: Tensor, group_ids: Tensor, bad: Tensor, applicable: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(r_each [N, K], r [N, J], mask [N, J])``: one estimator per reward, and the one(s)
        the update trains on with the samples each applies to: ``r_each`` and ``applicable``
        themselves, or the baselines' ONE estimator on ``R @ w`` (:meth:`Balancer.mix`)."""
        r_each = self.optimality_probabilities(rewards, group_ids, bad, None, applicable)
        mix = self.module.balancer.mix()
        if mix is None:
            return r_each, r_each, applicable
        r = self.optimality_probabilities(rewards, group_ids, bad, mix, applicable)
        return r_each, r, self.mixed_applicability(applicable, mix)

    @staticmethod
    def mixed_applicability(applicable: Tensor, combine: np.ndarray) -> Tensor:
        """``[N, 1]``: the samples ``R @ w`` applies to: some reward with ``w_k > 0`` applies."""
        w = torch.as_tensor(combine, device=applicable.device) > 0
        return (applicable & w).any(1, keepdim=True)

    def loss_mask(self, mask: Tensor, count: int) -> LossMask:
        """Each column's loss averaged over its valid pairs (``mask [N, J]``, ``count`` timesteps
        per image), with the count taken over every data-parallel rank (one small all-reduce;
        every rank must call this)."""
        counts = self.module.ranks.sum(mask.sum(0).to(torch.float64))
        weights = masked_mean_weights(mask, counts * count).to(torch.float32)
        return LossMask(mask, counts, weights)

    def check_finite(self, rewards: Tensor, applicable: Tensor | None = None) -> Tensor:
        """Apply the non-finite policy: a clear error, or a mask of the rows to neutralise.

        Only where the reward applies: a NaN where it does not is its "not applicable".
        """
        bad = ~torch.isfinite(rewards)
        if applicable is not None:
            bad &= applicable.to(bad.device)
        if not bad.any():
            return bad
        names = [self.module.reward_names[k] for k in bad.any(0).nonzero().flatten().tolist()]
        if self.module.hparams.nonfinite_rewards == "error":
            raise NonFiniteRewardError(
                f"reward(s) {names} returned NaN/inf for {int(bad.sum())} of {bad.numel()} scores at "
                f"step {self.module.global_step}. Fix the reward model, or set "
                "`model.nonfinite_rewards: drop` to give those samples no push (counted in "
                "`rewards/nonfinite`)."
            )
        self.module.counters["nonfinite_rewards"] += int(bad.sum())
        return bad

    def optimality_probabilities(
        self,
        rewards: Tensor,
        group_ids: Tensor,
        bad: Tensor,
        combine: np.ndarray | None = None,
        applicable: Tensor | None = None,
        clip: bool = True,
    ) -> Tensor:
        """``r``: ``[N, K]``, one estimator per reward; or ``[N, 1]`` on ``R @ combine``.

        ``clip=False``: ``r = 0.5 + 0.5 A / a_max`` without clipping ``A`` (outside ``[0, 1]``
        where ``|A| > a_max``), for a combination clipped afterwards.

        ``combine`` is the weighted sum's ``w`` (a one-hot for ``single``). Dropped (non-finite)
        scores get their group's mean before the advantages and ``r = 0.5`` after. With
        ``advantage_std: global`` the standard deviation is that of the global batch, every
        data-parallel rank's rewards (one small all-gather; every rank must call this).

        ``applicable`` (``[N, K]`` bool, all True when None): a reward's group means and
        standard deviation use the samples it applies to only, and the others get ``r = 0.5``
        for it (advantage 0). ``R @ w`` renormalises ``w`` per sample over the rewards that
        apply to it, ``sum_k w_k a_ik R_ik / sum_k w_k a_ik``; a sample none of whose weighted
        rewards applies is outside the combined estimator (``r = 0.5``). Applicability is a
        property of the prompt, so a group's samples share their weights and the group-centred
        combination compares like with like.
        """
        hp = self.module.hparams
        app = torch.ones_like(bad) if applicable is None else applicable.to(bad.device)
        valid = app & ~bad
        clean = torch.where(valid, rewards, torch.zeros_like(rewards))
        if bad.any():
            clean = self.fill_group_mean(clean, bad, group_ids, valid)
        mask = app
        if combine is not None:
            w = torch.as_tensor(combine, dtype=clean.dtype, device=clean.device)
            bad = bad[:, w > 0].any(1, keepdim=True)
            mask = self.mixed_applicability(app, combine)
            if app.all():
                clean = (clean @ w).unsqueeze(1)
            else:  # renormalise w per sample over the rewards that apply to it
                wm = app.to(clean.dtype) * w
                total = wm.sum(1, keepdim=True)
                clean = (clean * wm).sum(1, keepdim=True) / torch.where(mask, total, 1.0)
        keep = None if mask.all() else mask  # the unmasked path when every reward applies
        sigma = self.global_std(clean, keep) if hp.advantage_std == "global" else None
        adv = group_advantages(
            clean,
            group_ids,
            eps=hp.advantage_eps,
            std=hp.advantage_std,
            global_std=sigma,
            mask=keep,
        )
        r = optimality(adv, hp.a_max) if clip else 0.5 + 0.5 * adv / hp.a_max
        return torch.where(bad | ~mask, torch.full_like(r, 0.5), r)

    def unclipped(self, scored: ScoredBatch) -> Tensor:
        """``r [N, K]`` without the per-reward clip (``clip_combined_advantage`` clips later)."""
        s = scored
        return self.optimality_probabilities(
            s.rewards, s.group_ids, s.bad, None, s.applicable, clip=False
        )

    @staticmethod
    def fill_group_mean(
        values: Tensor, bad: Tensor, group_ids: Tensor, valid: Tensor | None = None
    ) -> Tensor:
        """Each dropped score takes the mean of its group's valid scores of that reward."""
        valid = ~bad if valid is None else valid
        out = values.clone()
        for g in group_ids.unique():
            rows = group_ids == g
            for k in range(values.shape[1]):
                ok = rows & valid[:, k]
                fill = values[ok, k].mean() if ok.any() else values.new_zeros(())
                out[rows & bad[:, k], k] = fill
        return out

    def global_std(self, rewards: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[K]``: population std of ``rewards`` over every data-parallel rank's batch.

        Each rank's ``(count, mean, M2)`` per reward are all-gathered and pooled exactly
        (:func:`~marble_pl.advantages.pooled_std`); the per-prompt means stay per rank, as groups
        never span ranks. On one process it is the std of this batch. ``mask``: each reward's
        values where it applies only (0 for a reward that applies nowhere).
        """
        moments = batch_moments(rewards, mask)  # [3, K] float64
        moments = self.module.ranks.gather(moments)  # [W, 3, K] over several ranks
        return pooled_std(moments, allow_empty=True)

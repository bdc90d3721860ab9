"""DiffusionNFT's loss on a step's training pairs: the pairs, their forwards and backwards.

:class:`TrainingPairs` are the (image, timestep) pairs one update trains on; :class:`PairObjective`
runs the policy's velocities on them (trained ``v_theta``, sampling ``v_old``, reference ``v_ref``
for the KL), folds the per-image output statistics the ``output`` space's Gram is made of, and
accumulates the ONE update's backward over the micro-batches. The math is in :mod:`marble_pl.nft`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from marble_pl.gradients import parameter_grads
from marble_pl.nft import nft_loss, nft_output_stats

if TYPE_CHECKING:
    from marble_pl.module import MarbleModule
    from marble_pl.policies import Conditioning

__all__ = ["Forward", "LossMask", "PairObjective", "StepBatch", "TrainingPairs"]

Forward = tuple[Tensor | None, Tensor]
"""A micro-batch's ``(v_theta, v_old)`` kept for the update (``v_theta`` None: run it again)."""


@dataclass
class TrainingPairs:
    """The (image, timestep) pairs one update trains on, image-major: ``x_t``, ``t``, ``v*``.

    ``image[p]`` is the rollout image of pair ``p``; ``count`` pairs per image.
    """

    x_t: Tensor
    t: Tensor
    v_target: Tensor
    image: Tensor
    count: int

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def chunks(self, size: int | None) -> list[slice]:
        """Consecutive micro-batches of at most ``size`` pairs (one when ``size`` is None)."""
        n = len(self)
        size = n if size is None else size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def subset(self, part: slice) -> TrainingPairs:
        """The pairs of ``part`` (consecutive micro-batches), images indexed as in the batch."""
        return TrainingPairs(
            self.x_t[part], self.t[part], self.v_target[part], self.image[part], self.count
        )


@dataclass
class LossMask:
    """Which samples each loss column averages over: ``mask [N, J]`` (this rank), the GLOBAL
    count of valid images per column ``counts [J]`` (all ranks) and the per-image loss weights
    ``weights [N, J] = mask / (count * T)`` (:func:`~marble_pl.gradients.masked_mean_weights`;
    each of an image's ``T`` pairs carries it)."""

    mask: Tensor
    counts: Tensor
    weights: Tensor

    @property
    def present(self) -> np.ndarray:
        """``[J]`` bool: the columns with a valid sample on some rank."""
        return (self.counts > 0).cpu().numpy()


@dataclass
class StepBatch:
    """What a step's balance and update train on: the pairs, their images' conditioning, the
    estimators ``r [N, J]``, their loss weights ``w [N, J]`` and the columns ``present``."""

    pairs: TrainingPairs
    cond: Conditioning
    r: Tensor
    w: Tensor
    present: np.ndarray

    def subset(self, part: slice) -> StepBatch:
        """The same batch on the pairs of ``part`` (one group of micro-batches)."""
        return StepBatch(self.pairs.subset(part), self.cond, self.r, self.w, self.present)


class PairObjective:
    """The NFT loss on training pairs through ``module``'s policy (velocities, backwards,
    data-parallel reductions); ``module.hparams`` are read live."""

    def __init__(self, module: MarbleModule) -> None:
        self.module = module

    @property
    def hparams(self) -> Any:
        """The module's hyperparameters (``beta``, ``kl_beta``, ``micro_batch_size``, ...)."""
        return self.module.hparams

    def loss_kwargs(self, t: Tensor) -> dict[str, Any]:
        """The loss form's keyword arguments of :func:`~marble_pl.nft.nft_loss` at ``t``."""
        hp = self.hparams
        if hp.loss_form == "reference":
            return {"t": t, "adaptive_weight": True, "scale": hp.a_max / hp.beta}
        return {}

    @staticmethod
    def error_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
        """The loss kwargs :func:`~marble_pl.nft.nft_errors` takes (all but ``scale``)."""
        return {key: value for key, value in kw.items() if key != "scale"}

    def pair_forward(
        self, pairs: TrainingPairs, mb: slice, cond: Conditioning, *, v_old: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        """``(v_theta, v_old, v*, loss kwargs)`` of one micro-batch; ``v_theta`` with grad if on."""
        module = self.module
        rows = tuple(c[pairs.image[mb]] for c in cond)
        x_t, t = pairs.x_t[mb], pairs.t[mb]
        if v_old is None:
            with torch.no_grad(), module.policy.use_adapter(module.policy.sampling_adapter):
                v_old = module.velocity(x_t, t, *rows)
        v_theta = module.velocity(x_t, t, *rows)
        return v_theta, v_old, pairs.v_target[mb], self.loss_kwargs(t)

    def kl(self, pairs: TrainingPairs, mb: slice, cond: Conditioning, v_theta: Tensor) -> Tensor:
        """``kl_beta * sum over the micro-batch of mean (v_theta - v_ref)^2`` (base model v_ref)."""
        rows = tuple(c[pairs.image[mb]] for c in cond)
        with torch.no_grad(), self.module.policy.use_adapter(None):
            v_ref = self.module.velocity(pairs.x_t[mb], pairs.t[mb], *rows)
        return self.hparams.kl_beta * (v_theta - v_ref).square().flatten(1).mean(1).sum()

    def reduce_losses(self, loss_sum: Tensor, total: int, w: Tensor | None) -> Tensor:
        """The batch's losses from this rank's sums: weighted sums add up over the ranks."""
        return loss_sum / total if w is None else self.module.ranks.sum(loss_sum)

    def fold_stats(
        self,
        seen: tuple[Tensor, Tensor] | None,
        pairs: TrainingPairs,
        mb: slice,
        r: Tensor,
        v: tuple[Tensor, Tensor, Tensor],
        kw: dict[str, Any],
        w: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Add one micro-batch's per-image output statistics and per-reward loss sums
        (weighted by ``w [N, K]`` per image when given)."""
        hp = self.hparams
        if seen is None:
            seen = (
                torch.zeros(r.shape[0], 3, dtype=torch.float64, device=r.device),
                torch.zeros(r.shape[1], dtype=torch.float64, device=r.device),
            )
        stats, loss_sum = seen
        v_theta, v_old, v_target = v[0].detach(), v[1], v[2]
        with torch.no_grad():
            stats.index_add_(
                0, pairs.image[mb], nft_output_stats(v_theta, v_old, v_target, hp.beta, **kw)
            )
            rows = r[pairs.image[mb]]
            losses = nft_loss(v_theta, v_old, v_target, rows, hp.beta, **kw)
            if w is not None:
                losses = losses * w[pairs.image[mb]].to(losses.dtype)
            loss_sum += losses.double().sum(0)
        return stats, loss_sum

    def accumulate_update(
        self,
        pairs: TrainingPairs,
        cond: Conditioning,
        r_bar: Tensor,
        kept: list[Forward] | None,
        stats_of: Tensor | None = None,
        weights: tuple[Tensor, Tensor] | None = None,
        mixes: Sequence[tuple[Tensor, Tensor] | None] | None = None,
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """Backward of ``sum_p c_p l_p(r_bar_p) + KL`` over all micro-batches: gradients add up.

        ONE backward per micro-batch gives ``sum_k lambda_bar_k g_k`` (the loss is affine in r,
        :func:`~marble_pl.gradients.affine_combination` gives ``r_bar`` and ``c``). ``weights``
        is ``(c [N], w [N, K])`` per image (None: ``c`` the plain mean, ``w`` too); ``c`` holds
        the global denominators, so each rank's objective is scaled by the world size against
        DDP's averaging. Returns the loss, the KL term (None when ``kl_beta == 0``) and, for
        ``stats_of`` (``r [N, K]``, the lagged balance; ``w`` its loss weights), the
        output-space statistics and losses the same forwards give at no extra cost. ``mixes[i]``
        (when given and not None) replaces ``(r_bar, c)`` on micro-batch ``i`` (the micro-batches
        that solved their own coefficients, :meth:`~marble_pl.cadence.StepBalance.solve_micro_batches`).
        """
        hp, module = self.hparams, self.module
        total = float(len(pairs))
        c, w = (None, None) if weights is None else weights
        world = module.ranks.world
        loss_sum = torch.zeros((), dtype=torch.float64, device=r_bar.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=r_bar.device)
        chunks = pairs.chunks(hp.micro_batch_size)
        seen: tuple[Tensor, Tensor] | None = None
        for i, mb in enumerate(chunks):
            v_theta, v_old = kept[i] if kept is not None else (None, None)
            if v_theta is None:
                v_theta, v_old, v_target, kw = self.pair_forward(pairs, mb, cond, v_old=v_old)
            else:
                v_target, kw = pairs.v_target[mb], self.loss_kwargs(pairs.t[mb])
            if stats_of is not None:
                v = (v_theta, v_old, v_target)
                seen = self.fold_stats(seen, pairs, mb, stats_of, v, kw, w)
            mix = mixes[i] if mixes is not None else None
            rb, cc = (r_bar, c) if mix is None else mix
            per = nft_loss(v_theta, v_old, v_target, rb[pairs.image[mb]], hp.beta, **kw)
            if cc is None:
                objective = per.sum() / total
            else:
                objective = (per * cc[pairs.image[mb]].to(per.dtype)).sum() * world
            loss_sum += objective.detach().double()
            if hp.kl_beta > 0:
                kl = self.kl(pairs, mb, cond, v_theta) / total
                objective = objective + kl
                kl_sum += kl.detach().double()
            with module.ranks.no_sync_unless(i == len(chunks) - 1):
                module.manual_backward(objective)
        kl_out = kl_sum.float() if hp.kl_beta > 0 else None
        if seen is not None:
            seen = (seen[0], self.reduce_losses(seen[1], len(pairs), w).to(stats_of.dtype))
        return loss_sum.float(), kl_out, seen

    def loss_grads(
        self,
        pairs: TrainingPairs,
        cond: Conditioning,
        r_cols: Tensor,
        w_cols: Tensor | None = None,
    ) -> Tensor:
        """``[J, P]`` parameter gradients of the batch's NFT loss, one per column of ``r_cols
        [N, J]``: the mean over the batch, or ``sum_p w_pj l_p`` with the per-image weights
        ``w_cols [N, J]`` (this rank's part; re-runs each micro-batch's forward)."""
        hp = self.hparams
        total = float(len(pairs))
        out = None
        for mb in pairs.chunks(hp.micro_batch_size):
            v_theta, v_old, v_target, kw = self.pair_forward(pairs, mb, cond, v_old=None)
            cols = r_cols[pairs.image[mb]].to(v_theta.dtype)
            losses = nft_loss(v_theta, v_old, v_target, cols, hp.beta, **kw)
            if w_cols is None:
                losses = losses.sum(0) / total
            else:
                losses = (losses * w_cols[pairs.image[mb]].to(losses.dtype)).sum(0)
            g = parameter_grads(losses, self.module.lora_params)
            out = g if out is None else out + g
        return out

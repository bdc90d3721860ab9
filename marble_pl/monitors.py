"""What callbacks see of a training step: its record, and the gradient monitors' context.

:class:`StepRecord` is kept on the module after each step (``last_step``); gradient monitors
(callbacks with ``on_marble_gradients``) get a :class:`GradientContext` on the balanced steps,
through :class:`GradientWatch`, before the update (after it under the lagged balance).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from marble_pl.balance import BalanceResult
from marble_pl.objective import LossMask, StepBatch

if TYPE_CHECKING:
    from marble_pl.cadence import BalancePlan
    from marble_pl.module import MarbleModule

__all__ = ["GradientContext", "GradientWatch", "ScoredBatch", "StepRecord"]


@dataclass
class StepRecord:
    """What one training step computed, kept for callbacks (cosine monitor, tests).

    ``r`` is per reward ``[N, K]``; ``r_train`` what the balancer trains on (``r``, or the
    baselines' one column). ``grads`` are the per-reward gradients (``[K, P]`` in ``parameters``
    space, ``None`` in ``output`` space where ``gram`` is the output-space Gram); ``weights_raw``
    is ``lambda*``, ``weights`` the coefficients applied (after the EMA); ``direction`` the
    applied gradient.
    """

    rewards: Tensor
    r: Tensor
    r_train: Tensor
    gram: Tensor | None
    weights_raw: np.ndarray
    weights: np.ndarray
    grads: Tensor | None
    direction: Tensor | None
    balance: BalanceResult | None
    applicable: Tensor | None = None
    """``[N, K]`` bool: the samples each reward applies to (:meth:`MarbleModule.applicability`)."""
    loss_weights: Tensor | None = None
    """``[N, J]`` per-image loss weights of ``r_train``'s columns (:meth:`MarbleModule.loss_weights`)."""


@dataclass
class GradientContext:
    """What a gradient monitor sees of a step, before the update is applied.

    ``r`` is ``[N, K]`` (one estimator per reward, whatever the balancer), ``r_applied`` the
    ``[N]`` optimality probabilities of the update about to be applied. In ``output`` space
    ``stats`` are :func:`~marble_pl.nft.nft_output_stats` summed over each image's training
    timesteps (output-space Grams of any ``r``); in ``parameters`` space ``grads`` /
    ``direction`` are the per-reward gradients and the update. :meth:`param_grads` runs one
    forward and one backward per column over the step's micro-batches.
    """

    module: MarbleModule
    rewards: Tensor
    group_ids: Tensor
    bad: Tensor
    r: Tensor
    r_applied: Tensor
    stats: Tensor | None
    grads: Tensor | None
    direction: Tensor | None
    grads_fn: Callable[[Tensor], Tensor]
    weights_raw: np.ndarray | None = None
    """This step's ``lambda*`` (from the Gram of the step's gradient space)."""
    losses: Tensor | None = None
    """This step's per-reward mean losses ``[K]`` (the ``loss`` normalisation's scales)."""
    applicable: Tensor | None = None
    """``[N, K]`` bool: the samples each reward applies to."""
    loss_weights: Tensor | None = None
    """``[N, K]``: each reward's loss weights (its loss averaged over its valid samples)."""
    c_applied: Tensor | None = None
    """``[N]``: the update's per-image loss weights (with ``r_applied``, :func:`affine_combination`)."""
    active: np.ndarray | None = None
    """``[K]`` bool: the rewards with samples in the batch and a usable gradient."""
    weights_fn: Callable[[Tensor], Tensor] | None = None

    def param_grads(self, r_cols: Tensor, weights: Tensor | None = None) -> Tensor:
        """Exact parameter-space gradients ``[J, P]`` of the batch's NFT loss for ``r_cols [N, J]``.

        ``weights`` ``[N, J]`` (global loss weights, :meth:`loss_weights_for`): column ``j``'s
        loss is ``sum_i w_ij l_i``; None: the plain mean over the batch.
        """
        if weights is None:
            return self.module.ranks.mean(self.grads_fn(r_cols))
        return self.module.ranks.sum(self.grads_fn(r_cols, weights))

    def loss_weights_for(self, mask: Tensor) -> Tensor:
        """``[N, J]`` loss weights averaging each column over its ``mask`` (global counts)."""
        assert self.weights_fn is not None
        return self.weights_fn(mask)

    def reduce_sum(self, x: Tensor) -> Tensor:
        """Sum over data-parallel ranks (output-space Grams add up over samples)."""
        return self.module.ranks.sum(x)


@dataclass
class ScoredBatch:
    """A step's scores: ``rewards [N, K]``, the prompts' ``group_ids``, the dropped scores
    ``bad``, one estimator per reward ``r_each``, where each reward ``applicable`` and its
    loss mask ``each``."""

    rewards: Tensor
    group_ids: Tensor
    bad: Tensor
    r_each: Tensor
    applicable: Tensor
    each: LossMask


def present_and_active(present: np.ndarray, result: BalanceResult | None) -> np.ndarray:
    """``[K]`` bool: the rewards with samples and (when balanced) a usable gradient."""
    active = None if result is None else result.active
    return present & active if active is not None and active.shape == present.shape else present


class GradientWatch:
    """Shows a step's gradients to the gradient monitors: balanced steps before the update
    (lagged ones after it, when their Gram is known), in-between steps to their audit."""

    def __init__(self, module: MarbleModule, scored: ScoredBatch, batch: StepBatch) -> None:
        self.module, self.scored, self.batch = module, scored, batch
        trainer = module._trainer
        callbacks = trainer.callbacks if trainer is not None else []
        self.monitors = [cb for cb in callbacks if hasattr(cb, "on_marble_gradients")]

    def before(self, plan: BalancePlan) -> None:
        """Before the update: a step balanced on its own Gram, or the between-steps audit."""
        if self.monitors and plan.mode is None:
            self.notify(plan)
        elif self.monitors and plan.mode == "between":
            self.module.balancing.audit_between(self.monitors, self.batch, plan.lam)

    def after(self, plan: BalancePlan) -> None:
        """After the update: the lagged balance's Gram, which the update's forwards gave."""
        if self.monitors and plan.mode == "lagged":
            self.notify(plan)

    def notify(self, plan: BalancePlan) -> None:
        """Every monitor's ``on_marble_gradients`` with this step's :class:`GradientContext`."""
        module, s, batch = self.module, self.scored, self.batch
        objective, measured = module.balancing.space.objective, plan.measured
        pairs, cond = batch.pairs, batch.cond
        ctx = GradientContext(
            module, s.rewards, s.group_ids, s.bad, s.r_each, plan.r_bar,
            measured.stats, measured.grads, plan.direction,
            grads_fn=lambda cols, wts=None: objective.loss_grads(pairs, cond, cols, wts),
            weights_raw=plan.raw, losses=measured.losses, applicable=s.applicable,
            loss_weights=s.each.weights, c_applied=plan.c,
            active=present_and_active(s.each.present, plan.result),
            weights_fn=lambda mk: module.scorer.loss_mask(mk, pairs.count).weights,
        )  # fmt: skip
        for cb in self.monitors:
            cb.on_marble_gradients(module.trainer, module, ctx)

"""Where a step's balancing coefficients come from: the cadence of the balance as one object.

:class:`StepBalance` plans each step (:meth:`~StepBalance.plan`): balanced exactly on this
batch's Gram (the gradient space's :meth:`~marble_pl.spaces.GradientSpace.measure`), or with the
earlier batches' coefficients ``lambda_bar``: ``between`` two balanced steps
(``balance_every_n_steps``), ``lagged`` (``lagged_balance``: this batch's Gram folded in after
the update, from the update's own forwards) or ``micro`` (``balance_on: first_micro_batch``:
some micro-batches solve on their own Gram, :class:`~marble_pl.balance.BalanceCadence`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from marble_pl.balance import BalanceCadence, BalanceResult
from marble_pl.balancers import resolve_balancer
from marble_pl.gradients import affine_combination, cosines, update_direction
from marble_pl.objective import StepBatch, TrainingPairs
from marble_pl.spaces import GradientSpace, Measurement

if TYPE_CHECKING:
    from marble_pl.module import MarbleModule
    from marble_pl.policies import Conditioning

__all__ = ["BalancePlan", "Mode", "StepBalance"]

Mode = Literal["lagged", "between", "micro"]
"""How a step reuses earlier coefficients (None: balanced exactly on this batch)."""


@dataclass
class BalancePlan:
    """A step's coefficients and the update they make: ``raw`` (``lambda*``), ``weights``
    (``lambda_bar``, applied) and ``lam`` (their tensor), the update's ``r_bar [N]`` and loss
    weights ``c [N]``, per micro-batch ``mixes`` (those that solved), the space's
    ``measured`` Gram and gradients, and ``direction`` when the update is already known."""

    mode: Mode | None
    measured: Measurement | None
    raw: np.ndarray
    weights: np.ndarray
    result: BalanceResult | None
    lam: Tensor
    r_bar: Tensor
    c: Tensor
    mixes: list[tuple[Tensor, Tensor] | None] | None = None
    direction: Tensor | None = None

    @property
    def gram(self) -> Tensor | None:
        """The Gram this step measured (None on steps that reuse coefficients)."""
        return self.measured.gram if self.measured is not None else None

    @property
    def grads(self) -> Tensor | None:
        """The per-reward gradients ``[K, P]`` this step measured (parameter spaces only)."""
        return self.measured.grads if self.measured is not None else None


class StepBalance:
    """The balance of ``module``'s steps: cadence, solves, cached coefficients and their EMA."""

    def __init__(self, module: MarbleModule, space: GradientSpace, cadence: BalanceCadence) -> None:
        self.module = module
        self.space = space
        self.cadence = cadence

    # ------------------------------------------------------------------ a step's plan

    def plan(
        self, batch: StepBatch, unclipped: Callable[[], Tensor], monitored: bool = False
    ) -> BalancePlan:
        """This step's coefficients: solved on the batch's Gram, or the cached ones."""
        mode = self.mode(batch.pairs)
        need = self.module.balancer.needs_gram or monitored
        measured = None if mode else self.space.measure(batch, need)
        solved = None
        if mode == "micro":
            solved = self.solve_micro_batches(
                batch.pairs, batch.cond, batch.r, batch.w, batch.present
            )
        if mode:
            coefficients = self.previous_coefficients(batch.present, between=mode == "between")
        else:
            coefficients = self.coefficients(measured.gram, measured.losses, present=batch.present)
        raw, weights, result = coefficients
        lam = self.as_lam(weights, batch.r)
        r_bar, c = self.combination(batch.r, batch.w, lam, mode, unclipped)
        mixes = None
        if solved is not None:  # the solving micro-batches apply their own fresh coefficients
            fresh, raw, result = solved
            mixes = [
                None if f is None else affine_combination(batch.r, batch.w, self.as_lam(f, batch.r))
                for f in fresh
            ]
        direction = self.space.direction(measured, lam)
        return BalancePlan(mode, measured, raw, weights, result, lam, r_bar, c, mixes, direction)

    def apply(self, plan: BalancePlan, batch: StepBatch) -> tuple[Tensor, Tensor | None]:
        """The ONE update of the plan (``(loss, kl)``); the lagged balance then folds this
        batch's Gram, which the update's own forwards gave, into the coefficients."""
        lagged = plan.mode == "lagged"
        loss, kl, seen = self.space.apply(plan, batch, stats_of=batch.r if lagged else None)
        if lagged:
            stats, losses = seen
            m = self.space.gram_of(stats, batch.r, batch.w)
            plan.raw, _, plan.result = self.coefficients(
                m, losses, guard=False, present=batch.present
            )
            plan.measured = Measurement(m, losses, stats=stats)
        return loss, kl

    def mode(self, pairs: TrainingPairs) -> Mode | None:
        """Whether this step applies earlier batches' coefficients instead of balancing first.

        ``micro``: the cadence (:class:`~marble_pl.balance.BalanceCadence`) solves on some
        micro-batches only (:meth:`solve_micro_batches`); the others apply the cached
        coefficients. ``between``: a step between two balanced ones (``balance_every_n_steps``):
        no Gram at all. ``lagged`` (``lagged_balance``): only where it saves work, in a space
        whose update gives the Gram (``output``) with more than one micro-batch; this batch's
        Gram is folded in after the update. The last two need earlier coefficients (the first
        step is balanced exactly) and a balancer that uses them.
        """
        module = self.module
        hp = module.hparams
        if not module.balancer.needs_gram:
            return None
        chunks = len(pairs.chunks(hp.micro_batch_size))
        groups = self.cadence.groups(module.global_step, chunks)
        if groups and groups != (tuple(range(chunks)),):
            return "micro"
        if self.previous_weights() is None:
            return None
        if not groups:
            return "between"
        if hp.lagged_balance and self.space.lags_for_free and chunks > 1:
            return "lagged"
        return None

    def combination(
        self,
        r: Tensor,
        w: Tensor,
        lam: Tensor,
        mode: Mode | None,
        unclipped: Callable[[], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """``(r_bar, c)`` of the update (:func:`affine_combination`). With cached coefficients
        (``between``, ``micro``) and ``clip_combined_advantage``: the combination of the
        unclipped ``r`` clipped to ``[0, 1]``, i.e. ``clip(sum_k lambda_k A_k, a_max)`` (the paper
        authors' amortized step)."""
        if mode not in ("between", "micro") or not self.module.hparams.clip_combined_advantage:
            return affine_combination(r, w, lam)
        r_bar, c = affine_combination(unclipped().to(r.dtype), w, lam)
        return r_bar.clamp(0.0, 1.0), c

    @staticmethod
    def as_lam(weights: np.ndarray, r: Tensor) -> Tensor:
        """Coefficients as a tensor on ``r``'s dtype and device."""
        return torch.as_tensor(weights, dtype=r.dtype, device=r.device)

    # ------------------------------------------------------------------ solves

    def coefficients(
        self,
        m: Tensor | None,
        losses: Tensor,
        guard: bool = True,
        present: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, BalanceResult | None]:
        """``(lambda*, lambda_bar, result)``; the baselines have one column and weight 1.

        ``guard=False`` folds ``lambda*`` into the EMA without the EMA guard's check (the
        lagged balance, whose coefficients were applied before this Gram was known).
        ``present`` (``[K]`` bool): the rewards with a valid sample in the global batch; the
        others, and those whose gradient is zero or not finite, leave the QP with weight 0
        (:meth:`~marble_pl.balancers.Balancer.balance`).
        """
        module = self.module
        balancer = module.balancer
        if not balancer.needs_gram or m is None:
            fixed = balancer.fixed_weights()  # EqualAlpha: per-reward, never solved
            one = np.ones(1) if fixed is None else fixed
            return one, one, None
        result = balancer.balance(m, losses.detach().double().cpu().numpy(), present)
        if result.active is not None and not result.active.any():
            # Nothing to balance (no reward with a sample and a usable gradient): zero weights,
            # the update is skipped (`trains_any_reward`, or its non-finite gradient), the EMA
            # is left untouched.
            return result.weights, result.weights, result
        if result.fallback:
            module.counters["qp_fallbacks"] += 1
        raw = module.ranks.broadcast(result.weights)
        return raw, self.smooth(raw, m if guard else None, result.active), result

    def solve_micro_batches(
        self,
        pairs: TrainingPairs,
        cond: Conditioning,
        r: Tensor,
        w: Tensor,
        present: np.ndarray,
    ) -> tuple[list[np.ndarray | None], np.ndarray, BalanceResult | None]:
        """The cadence's solves of this step, each on its group of micro-batches' own Gram.

        Returns the coefficients each micro-batch applies (None: the cached ones, read after
        the solves), and the last solve's ``lambda*`` and result (logged). Each solve goes
        through the coefficient EMA like a balanced step (``apply: fresh_on_solve`` returns the
        fresh ``lambda*``).
        """
        chunks = pairs.chunks(self.module.hparams.micro_batch_size)
        fresh: list[np.ndarray | None] = [None] * len(chunks)
        raw, result = np.ones(1), None
        batch = StepBatch(pairs, cond, r, w, present)
        for group in self.cadence.groups(self.module.global_step, len(chunks)):
            measured = self.space.measure(
                batch.subset(slice(chunks[group[0]].start, chunks[group[-1]].stop))
            )
            raw, applied, result = self.coefficients(
                measured.gram, measured.losses, present=present
            )
            for i in group:
                fresh[i] = applied
        return fresh, raw, result

    def coefficients_for(self, m: Tensor, losses: Tensor | None = None) -> np.ndarray:
        """The configured balancer's ``lambda*`` for another Gram ``m``, leaving its state alone.

        A fresh balancer of the same spec solves it (no warm start), so an audit does not move
        the training's solver state (exact resume).
        """
        fresh = resolve_balancer(self.module.balancer.spec())
        fresh.bind(self.module.reward_names)
        host = None if losses is None else losses.detach().double().cpu().numpy()
        return fresh.balance(m.detach().double().cpu().numpy(), host).weights

    # ------------------------------------------------------------------ cached coefficients

    def ema(self) -> Any:
        """The attached ``CoefficientEMA`` callback, if any."""
        from marble_pl.callbacks.coefficient_ema import CoefficientEMA

        module = self.module
        if module._trainer is None:
            return None
        return next((cb for cb in module.trainer.callbacks if isinstance(cb, CoefficientEMA)), None)

    def smooth(
        self, weights: np.ndarray, m: Tensor | None, active: np.ndarray | None = None
    ) -> np.ndarray:
        """``lambda_bar`` from the CoefficientEMA callback when one is attached, else ``lambda*``."""
        ema = self.ema()
        if ema is None:
            return weights
        return ema.update(weights, m) if active is None else ema.update(weights, m, active)

    def previous_weights(self) -> np.ndarray | None:
        """``lambda_bar`` of the earlier batches (the EMA's value, else the last balance's
        ``lambda*`` as applied: :attr:`~marble_pl.balancers.Balancer.last_applied`, not the
        solver's warm start, which may live in a normalised space)."""
        ema = self.ema()
        value = ema.value if ema is not None else None
        return value if value is not None else self.module.balancer.last_applied

    def previous_coefficients(
        self, present: np.ndarray | None = None, between: bool = False
    ) -> tuple[np.ndarray, np.ndarray, None]:
        """``(lambda*, lambda_bar)`` to apply under the lagged balance (no solve on this step).

        Restricted to the rewards ``present`` in this batch and renormalised (all zero when
        none of them has weight: the update is skipped). ``between`` balanced steps the
        coefficient EMA's guard checks them on the last balanced Gram (stale; its
        ``check_between``); the lagged balance has no Gram to check them on.
        """
        previous = np.asarray(self.previous_weights(), dtype=np.float64)
        ema = self.ema()
        checked = ema.between(present) if between and ema is not None else None
        if checked is not None:
            return previous, checked, None
        if present is None or previous.shape != np.shape(present) or np.all(present):
            return previous, previous, None
        kept = np.where(present, previous, 0.0)
        total = float(kept.sum())
        return previous, kept / total if total > 0 else kept, None

    def audit_between(
        self,
        monitors: list[Any],
        batch: StepBatch,
        lam: Tensor,
    ) -> None:
        """Exact cosines of a step between balanced ones with the update it applies, for the
        monitors that ask (``audit_between_steps``): K more backwards on that step only."""
        wanted = [cb for cb in monitors if getattr(cb, "audit_between_steps", False)]
        if not wanted:
            return
        module, objective = self.module, self.space.objective
        pairs, cond, r, w = batch.pairs, batch.cond, batch.r, batch.w
        if w is None:
            grads = module.ranks.mean(objective.loss_grads(pairs, cond, r))
        else:
            grads = module.ranks.sum(objective.loss_grads(pairs, cond, r, w))
        cos = cosines(grads, update_direction(grads, lam.to(grads.dtype)))
        present = np.asarray(batch.present, dtype=bool)
        for cb in wanted:
            cb.on_marble_between(module.trainer, module, cos, present)

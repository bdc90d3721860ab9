"""EMA of MARBLE's balancing coefficients, as a Lightning callback."""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
from lightning.pytorch import Callback
from torch import Tensor

from marble_pl.balance import EMA, conflicts, project_to_safe_set
from marble_pl.margin import COS_TOL, project_to_margin_set, update_cosines

__all__ = ["CoefficientEMA", "GuardMode", "DEFAULT_GUARD", "guard_mode", "ApplyMode"]

#: What a balanced step applies: the smoothed ``lambda_bar`` (marble-pl), or its own fresh
#: ``lambda*`` with ``lambda_bar`` applied only between solves (the paper authors' alpha EMA).
ApplyMode = Literal["smoothed", "fresh_on_solve"]

#: What a step applies when ``lambda_bar`` would push a reward backwards (see CoefficientEMA).
GuardMode = Literal["reset", "project", "off"]

#: The guard ``CoefficientEMA`` uses unless told otherwise: ``project``, chosen from the toy
#: study (``docs/toy_study.md``): the only mode with no exact conflict for every balancer, and
#: the smoothest applied weights (per-step change 0.042 vs 0.097 for ``reset``, K = 3), for
#: gains within one seed std of ``reset``'s.
DEFAULT_GUARD: GuardMode = "project"


def guard_mode(guard: GuardMode | bool) -> GuardMode:
    """``guard`` as a mode: booleans of the old API map ``True -> "reset"``, ``False -> "off"``."""
    if isinstance(guard, (bool, np.bool_)):
        return "reset" if guard else "off"
    if guard not in get_args(GuardMode):
        raise ValueError(
            f"guard must be one of {', '.join(map(repr, get_args(GuardMode)))} (or a boolean: "
            f"True = 'reset', False = 'off'), got {guard!r}"
        )
    return guard


class CoefficientEMA(Callback):
    r"""Smooths the QP's coefficients: ``lambda_bar = mu * lambda_bar + (1 - mu) * lambda*``.

    Single-batch Gram matrices are noisy; the update uses ``lambda_bar`` instead of ``lambda*``
    (ARCHITECTURE §2 step 7). The module asks this callback for ``lambda_bar`` in the middle of
    its training step; without the callback it applies the raw ``lambda*``. The EMA state is
    saved in Lightning checkpoints and restored on resume.

    The min-norm point ``lambda*`` never conflicts with a reward (``<g_k, d> >= ||d||^2``), but
    a smoothed ``lambda_bar`` can: on a batch whose gradients disagree strongly, the lagging
    average may push one reward backwards (checked exactly on the step's Gram, ``min_k (M
    lambda_bar)_k < 0``, :func:`~marble_pl.balance.conflicts`). The ``guard`` decides what such a
    step applies:

    * ``"reset"``: ``lambda*`` itself (the smoothing is off on that step);
    * ``"project"``: the nearest safe weights, the Euclidean projection of ``lambda_bar`` onto
      ``{lambda in simplex : M lambda >= 0}`` (:func:`~marble_pl.balance.project_to_safe_set`,
      ``lambda*`` if OSQP fails): as smooth as the constraint allows;
    * ``"off"``: ``lambda_bar`` regardless (no check).

    In every mode the EMA state folds in ``lambda*`` as usual (only what is applied differs), and
    the steps where the guard stepped in are counted (``lambda/guarded``).

    ``margin > 0`` asks more than "not backwards": every active reward's cosine with the update,
    ``(M lambda)_k / (sqrt(M_kk) sqrt(lambda^T M lambda))``, at least ``margin`` (the paper
    reports cosines "consistently positive"; the plain guard holds the binding reward at 0).
    ``reset`` then applies ``lambda*`` when ``lambda_bar`` misses the margin; ``project`` the
    nearest coefficients that meet it (:func:`~marble_pl.margin.project_to_margin_set`: OSQP on
    linear outer approximations of that convex set, the answer checked with the exact cosines),
    or ``lambda*`` where none do (counted: ``lambda/guard_infeasible``).

    Between balanced steps (``model.balance_every_n_steps > 1``) no Gram is computed: the module
    applies ``lambda_bar`` (:meth:`between`). With ``check_between`` it first runs the guard on
    the LAST balanced step's Gram, which is stale (the policy and the batch have moved since):
    a cheap check (a K x K problem), not the exact one (counted: ``lambda/guarded_between``).

    Args:
        decay: ``mu`` in [0, 1); 0 applies the raw coefficients.
        bias_correction: start from zero and divide by ``1 - mu^t`` (True), or start from uniform
            weights ``1/K`` (False).
        guard: ``"reset"``, ``"project"`` or ``"off"`` (default :data:`DEFAULT_GUARD`); booleans
            are still accepted: ``True`` is ``"reset"``, ``False`` is ``"off"``.
        start: with ``bias_correction=False``, the average starts from uniform weights
            (``"uniform"``) or takes the first ``lambda*`` raw (``"first"``, the paper authors').
        apply: ``"smoothed"`` applies ``lambda_bar`` on a balanced step; ``"fresh_on_solve"``
            applies that step's own ``lambda*`` (the EMA still folds it in) and ``lambda_bar``
            only where nothing is solved, as the paper authors' alpha EMA (no guard needed on the
            solve: ``lambda*`` never conflicts). Their setting: ``{decay: 0.7, bias_correction:
            false, start: first, guard: off, apply: fresh_on_solve}``.
        margin: the smallest cosine of the update with an active reward's gradient the guard
            accepts, in [0, 1) (0: not backwards, ``M lambda >= 0``).
        check_between: between balanced steps, run the guard on the last balanced step's
            (stale) Gram before applying ``lambda_bar`` (False: apply it unchecked).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: marble_pl.callbacks.CoefficientEMA
              init_args: {decay: 0.9, guard: reset}  # or project (nearest safe weights), off
    """

    def __init__(
        self,
        decay: float = 0.9,
        bias_correction: bool = True,
        guard: GuardMode | bool = DEFAULT_GUARD,
        start: Literal["uniform", "first"] = "uniform",
        apply: ApplyMode = "smoothed",
        margin: float = 0.0,
        check_between: bool = True,
    ) -> None:
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1) (a cosine), got {margin}")
        self.margin = float(margin)
        self.check_between = bool(check_between)
        self.guarded_between = 0
        self.infeasible = 0
        self._stale: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # idx, Gram, lambda*
        self.ema = EMA(decay=decay, bias_correction=bias_correction, start=start)
        if apply not in get_args(ApplyMode):
            raise ValueError(
                f"apply must be one of {', '.join(map(repr, get_args(ApplyMode)))}, got {apply!r}"
            )
        self.apply: ApplyMode = apply
        self.guard: GuardMode = guard_mode(guard)
        self.guarded = 0

    @property
    def value(self) -> np.ndarray | None:
        """The current ``lambda_bar`` (None before the first step)."""
        return self.ema.value

    def update(
        self,
        weights: np.ndarray,
        gram: np.ndarray | Tensor | None = None,
        active: np.ndarray | None = None,
    ) -> np.ndarray:
        """Fold in this step's ``lambda*``; return the coefficients to apply.

        That is ``lambda_bar``, unless the guard is on, the step's Gram is given and
        ``lambda_bar`` would conflict with a reward: then ``lambda*`` (``"reset"``) or the
        projection of ``lambda_bar`` onto the safe set (``"project"``).

        ``active`` (``[K]`` bool, from :meth:`~marble_pl.balancers.Balancer.balance`) marks the
        rewards that took part in this step's QP; the others have ``lambda*_k = 0`` (no sample,
        or a zero or non-finite gradient). The EMA folds that 0 in, as the paper authors' alpha
        EMA does; the coefficients applied are ``lambda_bar`` on the active rewards, renormalised
        to sum 1 (``lambda*`` if it has no mass there), and the guard checks the active
        rewards' Gram only: a reward without a usable gradient is never "pushed backwards". With
        no active reward at all nothing is folded in and zeros are returned (the step is skipped).
        """
        star = np.asarray(weights, dtype=np.float64)
        keep = np.ones(star.shape, dtype=bool) if active is None else np.asarray(active, bool)
        if not keep.any():
            return np.zeros_like(star)
        smoothed = self.ema.update(star)
        if gram is not None:  # kept for the steps between balanced ones (a stale check)
            idx = np.flatnonzero(keep)
            m = gram.detach().double().cpu().numpy() if isinstance(gram, Tensor) else gram
            self._stale = (idx, np.asarray(m, dtype=np.float64)[np.ix_(idx, idx)], star.copy())
        if self.apply == "fresh_on_solve":
            return star.copy()
        if not keep.all():
            total = float(smoothed[keep].sum())
            smoothed = np.where(keep, smoothed, 0.0) / total if total > 0 else star.copy()
        if self.guard == "off" or gram is None or self._stale is None:
            return smoothed
        idx, sub, _ = self._stale
        if not self._misses(sub, smoothed[idx]):
            return smoothed
        self.guarded += 1
        return self._guard(smoothed, star, idx, sub)

    def _misses(self, sub: np.ndarray, weights: np.ndarray) -> bool:
        """Whether ``weights`` break the guard's condition on the Gram ``sub`` (a reward pushed
        backwards; with a margin, a cosine below it)."""
        if self.margin > 0.0:
            return float(np.min(update_cosines(sub, weights))) < self.margin - COS_TOL
        return conflicts(sub, weights)

    def _guard(
        self, smoothed: np.ndarray, star: np.ndarray, idx: np.ndarray, sub: np.ndarray
    ) -> np.ndarray:
        """What the guard applies instead of ``smoothed`` (on the rewards ``idx``, Gram ``sub``)."""
        if self.guard == "reset":
            return star
        out = np.zeros_like(star)
        if self.margin > 0.0:
            res = project_to_margin_set(smoothed[idx], sub, self.margin, fallback=star[idx])
            self.infeasible += int(res.status == "infeasible")
            out[idx] = res.weights
        else:
            out[idx] = project_to_safe_set(smoothed[idx], sub, fallback=star[idx])
        return out

    def between(self, present: np.ndarray | None = None) -> np.ndarray | None:
        """Coefficients for a step between balanced ones: ``lambda_bar`` on the rewards
        ``present`` (renormalised; zeros when none has weight), guarded on the last balanced
        Gram (stale) when ``check_between`` and the guard is on. None before the first update.

        Only rewards that were active on that balanced step can be checked; if another one has
        weight, ``lambda_bar`` is applied unchecked.
        """
        bar = self.ema.value
        if bar is None:
            return None
        keep = np.ones(bar.shape, bool) if present is None else np.asarray(present, bool)
        if keep.shape != bar.shape or keep.all():
            keep = np.ones(bar.shape, bool)
        total = float(bar[keep].sum())
        if total <= 0.0:
            return np.zeros_like(bar)
        smoothed = np.where(keep, bar, 0.0) / total
        if not self.check_between or self.guard == "off" or self._stale is None:
            return smoothed
        idx, sub, star = self._stale
        cols = np.flatnonzero(smoothed > 0.0)
        if star.shape != bar.shape or not np.isin(cols, idx).all():
            return smoothed
        sel = np.isin(idx, np.flatnonzero(keep))
        idx, sub = idx[sel], sub[np.ix_(sel, sel)]
        if not self._misses(sub, smoothed[idx]):
            return smoothed
        star = np.where(np.isin(np.arange(star.size), idx), star, 0.0)
        star = star / star.sum() if star.sum() > 0 else smoothed
        self.guarded_between += 1
        return self._guard(smoothed, star, idx, sub)

    def state_dict(self) -> dict[str, Any]:
        stale = None if self._stale is None else [a.tolist() for a in self._stale]
        return {
            **self.ema.state_dict(),
            "guarded": self.guarded,
            "guarded_between": self.guarded_between,
            "infeasible": self.infeasible,
            "stale": stale,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the running average; the configured decay and bias correction win (resume
        with changed settings applies them)."""
        decay, bias_correction, start = self.ema.decay, self.ema.bias_correction, self.ema.start
        self.ema.load_state_dict(state_dict)
        self.ema.decay, self.ema.bias_correction = decay, bias_correction
        self.ema.start = start
        self.guarded = int(state_dict.get("guarded", 0))
        self.guarded_between = int(state_dict.get("guarded_between", 0))
        self.infeasible = int(state_dict.get("infeasible", 0))
        stale = state_dict.get("stale")
        self._stale = (
            None
            if stale is None
            else (
                np.asarray(stale[0], dtype=np.int64),
                np.asarray(stale[1], dtype=np.float64).reshape(len(stale[0]), len(stale[0])),
                np.asarray(stale[2], dtype=np.float64),
            )
        )

"""EMA of MARBLE's balancing coefficients, as a Lightning callback."""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
from lightning.pytorch import Callback
from torch import Tensor

from marble_pl.balance import EMA, conflicts, project_to_safe_set

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
    ) -> None:
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
        if self.apply == "fresh_on_solve":
            return star.copy()
        if not keep.all():
            total = float(smoothed[keep].sum())
            smoothed = np.where(keep, smoothed, 0.0) / total if total > 0 else star.copy()
        if self.guard == "off" or gram is None:
            return smoothed
        idx = np.flatnonzero(keep)
        m = gram.detach().double().cpu().numpy() if isinstance(gram, Tensor) else np.asarray(gram)
        sub = np.asarray(m, dtype=np.float64)[np.ix_(idx, idx)]
        if not conflicts(sub, smoothed[idx]):
            return smoothed
        self.guarded += 1
        if self.guard == "reset":
            return star
        out = np.zeros_like(star)
        out[idx] = project_to_safe_set(smoothed[idx], sub, fallback=star[idx])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**self.ema.state_dict(), "guarded": self.guarded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the running average; the configured decay and bias correction win (resume
        with changed settings applies them)."""
        decay, bias_correction, start = self.ema.decay, self.ema.bias_correction, self.ema.start
        self.ema.load_state_dict(state_dict)
        self.ema.decay, self.ema.bias_correction = decay, bias_correction
        self.ema.start = start
        self.guarded = int(state_dict.get("guarded", 0))

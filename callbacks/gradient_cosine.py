"""Per-reward gradient cosines with the applied update, and with the weighted-sum direction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from marble_pl.balance import gram
from marble_pl.errors import ConfigError
from marble_pl.gradients import cosines, output_cosines

__all__ = ["GradientCosineMonitor", "NEGATIVE_COS_TOL"]

#: A worst cosine counts as negative below ``-NEGATIVE_COS_TOL`` (the QP's round-off on the
#: boundary of the safe set is ~1e-7; the toy study uses the same threshold).
NEGATIVE_COS_TOL = 1e-6


class GradientCosineMonitor(Callback):
    r"""Logs ``cos(g_k, d)`` for every reward ``k``: the paper's evidence that no reward is left behind.

    Every training step it logs, against the update ``d`` actually applied (the gradient handed
    to the optimizer, before clipping and Adam's rescaling):

    * ``cos/<reward>`` and ``cos/min``;
    * ``cos_ws/<reward>`` and ``cos_ws/min``: the same against the direction the weighted-sum
      method would take on the same batch (the NFT gradient with ``r`` from ONE advantage
      estimator on ``R @ w``; ``w`` from ``weights``, uniform by default);
    * ``cos/frac_min_negative`` and ``cos_ws/frac_min_negative``: the running fraction of
      steps, since the start of the run, whose worst cosine is negative, below
      ``-NEGATIVE_COS_TOL`` (1e-6): coefficients projected onto the safe set sit on its
      boundary, where a held-still reward's cosine is 0 up to the QP's round-off (~1e-7).

    In ``output`` gradient space the cosines are output-space ones (closed form, no backward);
    in ``parameters`` and ``gramian`` space they are exact. Each reward's gradient is that of
    its loss averaged over the samples it applies to (the weighted-sum direction's over the
    samples ``R @ w`` applies to); a reward with no sample in the batch, or no usable
    gradient (it left the balance), has no cosine that step: it is not logged, not in the
    minimum, and a step where no reward has one is not counted in the fractions.
    Every ``audit_every_n_steps`` steps it also logs exact parameter-space cosines under
    ``cos_exact/...`` and ``cos_exact_ws/...`` (K + 2 backward passes on that step only), and
    how far the step's output-space coefficients are from those the balancer gives on the exact
    Gram: ``lambda_exact/<reward>`` and ``lambda_exact/gap`` (max absolute difference). In the
    exact spaces the weighted-sum direction costs one extra backward per step (K more for the
    baselines, which have no per-reward gradients). On steps that apply earlier coefficients
    without a Gram (``balance_every_n_steps``) nothing of the above is logged; with
    ``audit_between_steps`` those steps log exact parameter-space cosines with the update they
    apply under ``cos_between/<reward>``, ``cos_between/min`` and
    ``cos_between/frac_min_negative`` (K more backwards on each such step).
    The running counts are saved in checkpoints.

    Args:
        weights: the weighted-sum weights ``w`` (one per reward; uniform when None).
        audit_every_n_steps: exact parameter-space audit period in ``output`` space (0: never).
        audit_between_steps: audit the steps between balanced ones too (exact cosines).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: marble_pl.callbacks.GradientCosineMonitor
              init_args: {audit_every_n_steps: 10}
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        audit_every_n_steps: int = 0,
        audit_between_steps: bool = False,
    ) -> None:
        if weights is not None and (
            len(weights) == 0 or any(w < 0 for w in weights) or sum(weights) <= 0
        ):
            raise ConfigError(f"weights must be non-negative with a positive sum, got {weights}")
        if audit_every_n_steps < 0:
            raise ConfigError(f"audit_every_n_steps must be >= 0, got {audit_every_n_steps}")
        self.weights = None if weights is None else list(weights)
        self.audit_every_n_steps = audit_every_n_steps
        self.audit_between_steps = bool(audit_between_steps)
        self.steps_between = 0
        self.negative_between = 0
        self.steps = 0
        self.negative = 0
        self.negative_ws = 0
        self.last: dict[str, float] = {}

    def _ws_weights(self, k: int) -> np.ndarray:
        if self.weights is None:
            return np.full(k, 1.0 / k)
        if len(self.weights) != k:
            raise ValueError(
                f"GradientCosineMonitor has {len(self.weights)} weights for {k} rewards: "
                "give one weight per reward, in the order of model.rewards"
            )
        w = np.asarray(self.weights, dtype=np.float64)
        return w / w.sum()

    def on_marble_gradients(self, trainer: Trainer, pl_module: LightningModule, ctx: Any) -> None:
        """Called by ``MarbleModule`` after the balance, before the update is applied."""
        names = pl_module.reward_names
        k = len(names)
        w = self._ws_weights(k)
        r_ws = pl_module.scorer.optimality_probabilities(
            ctx.rewards, ctx.group_ids, ctx.bad, w, ctx.applicable
        ).to(ctx.r.dtype)
        wts, c, w_ws = ctx.loss_weights, ctx.c_applied, None  # None: uniform (plain mean)
        if ctx.applicable is not None and wts is not None:
            w_ws = ctx.loss_weights_for(pl_module.scorer.mixed_applicability(ctx.applicable, w))
        if self._uniform(wts) and self._uniform(c) and self._uniform(w_ws):
            wts = c = w_ws = None  # every reward applies everywhere: the plain means
        log: dict[str, float] = {}
        audit: dict[str, float] = {}
        if ctx.stats is None:  # parameters space: exact cosines
            per_reward = ctx.grads if ctx.grads.shape[0] == k else self._grads(ctx, ctx.r, wts)
            d_ws = self._grads(ctx, r_ws, w_ws)[0]
            cos, cos_ws = cosines(per_reward, ctx.direction), cosines(per_reward, d_ws)
        else:
            dirs = torch.stack([ctx.r_applied, r_ws[:, 0]], 1)
            dir_w = None if c is None or w_ws is None else torch.stack([c, w_ws[:, 0]], 1)
            both = output_cosines(ctx.stats, ctx.r, dirs, ctx.reduce_sum, wts, dir_w)
            cos, cos_ws = both[:, 0], both[:, 1]
            step = trainer.global_step
            if self.audit_every_n_steps and step % self.audit_every_n_steps == 0:
                cols = torch.cat([ctx.r, ctx.r_applied[:, None], r_ws], dim=1)
                col_w = None if dir_w is None else torch.cat([wts, dir_w], dim=1)
                g = self._grads(ctx, cols, col_w)
                active = self._active(ctx, k)
                audit.update(self._named("cos_exact", names, cosines(g[:k], g[k]), active))
                audit.update(self._named("cos_exact_ws", names, cosines(g[:k], g[k + 1]), active))
                audit.update(self._coefficient_gap(pl_module, names, g[:k], ctx))
        active = self._active(ctx, k) & torch.isfinite(cos).cpu().numpy()
        active_ws = self._active(ctx, k) & torch.isfinite(cos_ws).cpu().numpy()
        log.update(self._named("cos", names, cos, active))
        log.update(self._named("cos_ws", names, cos_ws, active_ws))
        if active.any():  # a step where no reward had samples and a gradient is not counted
            self.steps += 1
            self.negative += int(log["cos/min"] < -NEGATIVE_COS_TOL)
            self.negative_ws += int(log.get("cos_ws/min", 0.0) < -NEGATIVE_COS_TOL)
        if self.steps:
            log["cos/frac_min_negative"] = self.negative / self.steps
            log["cos_ws/frac_min_negative"] = self.negative_ws / self.steps
        self.last = {**log, **audit}
        pl_module.log_dict(log, batch_size=ctx.r.shape[0])
        if audit and trainer.is_global_zero:
            # Straight to the loggers: through self.log, Lightning would repeat the last audit's
            # values on every later step until the next audit.
            for logger in trainer.loggers:
                logger.log_metrics(audit, step=trainer.global_step)

    def on_marble_between(
        self, trainer: Trainer, pl_module: LightningModule, cos: torch.Tensor, active: np.ndarray
    ) -> None:
        """Called by ``MarbleModule`` on a step between balanced ones (``audit_between_steps``)
        with the exact cosines of every reward's gradient with the update it applies."""
        keep = np.asarray(active, dtype=bool) & torch.isfinite(cos).cpu().numpy()
        log = self._named("cos_between", pl_module.reward_names, cos, keep)
        if keep.any():
            self.steps_between += 1
            self.negative_between += int(log["cos_between/min"] < -NEGATIVE_COS_TOL)
        if self.steps_between:
            log["cos_between/frac_min_negative"] = self.negative_between / self.steps_between
        self.last = log
        pl_module.log_dict(log, batch_size=cos.shape[0])

    @staticmethod
    def _coefficient_gap(
        pl_module: LightningModule,
        names: Sequence[str],
        grads: torch.Tensor,
        ctx: Any,
    ) -> dict[str, float]:
        """How far this step's output-space ``lambda*`` is from the balancer's ``lambda*`` on the
        exact parameter-space Gram: ``lambda_exact/<name>`` and ``lambda_exact/gap`` (max
        absolute difference). Nothing for the baselines (their weights ignore the Gram)."""
        weights_raw = ctx.weights_raw
        if weights_raw is None or not pl_module.balancer.needs_gram:
            return {}
        exact = pl_module.balancing.coefficients_for(gram(grads), ctx.losses)
        out = {f"lambda_exact/{n}": float(v) for n, v in zip(names, exact, strict=True)}
        out["lambda_exact/gap"] = float(np.abs(np.asarray(weights_raw) - exact).max())
        return out

    @staticmethod
    def _grads(ctx: Any, cols: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Exact gradients of the columns' losses (weighted, or the plain means when None)."""
        return ctx.param_grads(cols) if weights is None else ctx.param_grads(cols, weights)

    @staticmethod
    def _uniform(weights: torch.Tensor | None) -> bool:
        """Whether ``weights`` are one positive value (the plain mean up to a scale)."""
        if weights is None:
            return True
        first = weights.flatten()[0]
        return bool(first > 0) and bool((weights == first).all())

    @staticmethod
    def _active(ctx: Any, k: int) -> np.ndarray:
        """``[K]`` bool: the rewards with samples in the batch and a usable gradient."""
        active = getattr(ctx, "active", None)
        return np.ones(k, dtype=bool) if active is None else np.asarray(active, dtype=bool)

    @staticmethod
    def _named(
        prefix: str, names: Sequence[str], values: torch.Tensor, keep: np.ndarray | None = None
    ) -> dict[str, float]:
        """``<prefix>/<name>`` and ``<prefix>/min`` over the rewards ``keep`` marks (a reward
        with no sample in the batch, or no usable gradient, has no cosine: it is left out)."""
        keep = np.ones(len(names), dtype=bool) if keep is None else keep
        vals = values.tolist()
        out = {f"{prefix}/{n}": float(v) for n, v, ok in zip(names, vals, keep, strict=True) if ok}
        if out:
            out[f"{prefix}/min"] = min(out.values())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "negative": self.negative,
            "negative_ws": self.negative_ws,
            "steps_between": self.steps_between,
            "negative_between": self.negative_between,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        self.negative = int(state_dict["negative"])
        self.negative_ws = int(state_dict["negative_ws"])
        self.steps_between = int(state_dict.get("steps_between", 0))
        self.negative_between = int(state_dict.get("negative_between", 0))

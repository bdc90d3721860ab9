"""A training step's metrics: rewards, coefficients, the balance's solve, skips and timings.

:class:`StepLogger` logs through the module's ``log`` / ``log_dict``; the per-reward detail
metrics (K of each) are only assembled on the steps the logger writes (``log_every_n_steps``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from marble_pl.rewards.base import Metadata

if TYPE_CHECKING:
    from marble_pl.cadence import BalancePlan
    from marble_pl.module import MarbleModule

__all__ = ["StepLogger"]


class StepLogger:
    """Logs ``module``'s training steps (``reward/``, ``lambda/``, ``qp/``, ``updates/``, ...)."""

    def __init__(self, module: MarbleModule) -> None:
        self.module = module

    def effective_weights(self, weights: np.ndarray) -> np.ndarray:
        """Per-reward weights of an update: ``lambda`` (marble), ``w`` (weighted_sum), one-hot (single)."""
        return self.module.balancer.effective_weights(weights)

    def writes_this_step(self) -> bool:
        """Whether Lightning's logger writes this step's metrics (``log_every_n_steps``).

        Called after the optimizer step, when ``global_step`` already counts this step. The
        per-reward detail metrics (K of each) are only assembled on those steps: on the others
        ``self.log`` would store them for nothing, a cost that grows with K.
        """
        trainer = self.module._trainer
        if trainer is None:
            return True
        every = max(int(trainer.log_every_n_steps), 1)
        return trainer.global_step % every == 0 or bool(trainer.should_stop)

    def log_step(
        self,
        rewards: Tensor,
        bad: Tensor,
        loss: Tensor,
        kl: Tensor | None,
        plan: BalancePlan,
        times: tuple[float, float, float],
        n: int,
    ) -> None:
        """The step's rewards (``reward/``), coefficients (``lambda/``), solve (``qp/``), skips
        and timings; the per-reward details only on the steps the logger writes."""
        raw, weights, result = plan.raw, plan.weights, plan.result
        details = self.writes_this_step()
        log = {"loss": float(loss.detach())}
        for k, name in enumerate(self.module.reward_names):
            ok = ~bad[:, k]
            vals = rewards[ok, k]
            if not vals.numel():  # no score of this reward in the batch (not applicable)
                continue
            self.module.log(f"reward/{name}/mean", float(vals.mean()), prog_bar=True, batch_size=n)
            log[f"reward/{name}/std"] = float(vals.std()) if vals.numel() > 1 else 0.0
        if not details:  # nothing below would reach the logger this step: skip its cost
            return
        raw, weights = self.effective_weights(raw), self.effective_weights(weights)
        for name, lam, lam_bar in zip(self.module.reward_names, raw, weights, strict=True):
            log[f"lambda/{name}"] = float(lam)
            log[f"lambda_ema/{name}"] = float(lam_bar)
        if result is not None:
            log["qp/solve_ms"] = result.solve_seconds * 1e3
            log["qp/status"] = float(not result.fallback)  # 1: the balancer solved its problem
            log["qp/fallbacks"] = float(self.module.counters["qp_fallbacks"])
        if kl is not None:
            log["kl"] = float(kl.detach())
        ema = self.module.balancing.ema()
        if ema is not None and result is not None:
            log["lambda/guarded"] = float(ema.guarded)
        if ema is not None:
            log["lambda/guarded_between"] = float(ema.guarded_between)
            log["lambda/guard_infeasible"] = float(ema.infeasible)
        log["rewards/nonfinite"] = float(self.module.counters["nonfinite_rewards"])
        log["updates/skipped_nonfinite"] = float(self.module.counters["skipped_nonfinite"])
        log["updates/skipped_zero_grad"] = float(self.module.counters["skipped_zero_grad"])
        log["updates/skipped_no_reward"] = float(self.module.counters["skipped_no_reward"])
        rollout_s, reward_s, update_s = times
        log.update(
            {
                "time/rollout_s": rollout_s,
                "time/reward_s": reward_s,
                "time/update_s": update_s,
                "throughput/images_per_s": n / max(rollout_s + reward_s + update_s, 1e-9),
            }
        )
        self.module.log_dict(log, batch_size=n)

    def log_applicability(
        self,
        rewards: Tensor,
        unused: Tensor,
        counts: Tensor,
        metadata: Metadata | None,
        n: int,
    ) -> None:
        """``rewards/<name>/applicable``: the global batch's samples each reward applies to;
        ``reward_by_source/<name>/<source>``: this rank's mean score per prompt source (metadata
        ``source``, when the batch has it), over the samples the reward scored."""
        if not self.writes_this_step():
            return
        log = {
            f"rewards/{name}/applicable": float(count)
            for name, count in zip(self.module.reward_names, counts.tolist(), strict=True)
        }
        sources = [str((m or {}).get("source", "")) for m in (metadata or [])]
        for source in sorted(set(sources) - {""}):
            rows = torch.tensor([s == source for s in sources], device=rewards.device)
            tag = re.sub(r"[^A-Za-z0-9_.\-]", "_", source)
            for k, name in enumerate(self.module.reward_names):
                vals = rewards[rows & ~unused[:, k], k]
                if vals.numel():
                    log[f"reward_by_source/{name}/{tag}"] = float(vals.mean())
        self.module.log_dict(log, batch_size=n)

"""Gradient spaces: where a step's per-reward gradients and their Gram live.

One interface (:class:`GradientSpace`): :meth:`~GradientSpace.measure` gives what the balance
needs of a batch (the Gram ``M`` of the per-reward gradients and the per-reward losses), and
:meth:`~GradientSpace.apply` puts the ONE update ``sum_k lambda_k g_k`` (+ the KL gradient) into
the LoRA's ``.grad``. Three spaces (``model.gradient_space``):

* ``output`` (:class:`OutputSpace`): gradients with respect to the transformer's output, in
  closed form from per-image statistics (no extra backward; its Gram is the output space's).
* ``parameters`` (:class:`ParameterSpace`): exact LoRA-parameter gradients, K backwards.
* ``gramian`` (:class:`GramianSpace`): the same vectors from two backwards whatever K is
  (per-sample taps on the LoRA layers, :mod:`marble_pl.gramian`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from marble_pl.balance import gram
from marble_pl.gradients import assign_flat_grad, parameter_grads, update_direction
from marble_pl.gramian import LinearGradientTaps, affine_reward_grads, affine_split
from marble_pl.nft import nft_errors, nft_loss, output_gram
from marble_pl.objective import Forward, PairObjective, StepBatch, TrainingPairs

if TYPE_CHECKING:
    from marble_pl.cadence import BalancePlan
    from marble_pl.module import MarbleModule
    from marble_pl.policies import Conditioning

__all__ = [
    "SPACES",
    "GradientSpace",
    "GramianSpace",
    "Measurement",
    "OutputSpace",
    "ParameterSpace",
    "build_space",
]


@dataclass
class Measurement:
    """What a space measured of a batch: the Gram ``[K, K]`` and losses ``[K]`` the balance
    needs (None where it needs none), and what the update reuses: ``grads [K, P]``, the KL
    gradient and value (parameters), per-image ``stats [N, 3]`` and kept forwards (output)."""

    gram: Tensor | None
    losses: Tensor | None
    grads: Tensor | None = None
    kl_grad: Tensor | None = None
    kl: Tensor | None = None
    stats: Tensor | None = None
    kept: list[Forward] | None = None


class GradientSpace(ABC):
    """Per-reward gradients of a batch's losses and the update along their combination."""

    name: ClassVar[str]
    lags_for_free: ClassVar[bool] = False
    """Whether the update's own forwards give the batch's Gram (``lagged_balance`` saves work)."""

    def __init__(self, module: MarbleModule) -> None:
        self.module = module
        self.objective = PairObjective(module)

    @abstractmethod
    def measure(self, batch: StepBatch, need_gram: bool = True) -> Measurement:
        """The batch's Gram and losses (``need_gram`` False: only what the update reuses)."""

    def direction(self, measured: Measurement | None, lam: Tensor) -> Tensor | None:
        """The update ``sum_k lambda_k g_k`` when this step measured ``g`` (else None)."""
        return None

    def apply(
        self, plan: BalancePlan, batch: StepBatch, stats_of: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """Backward of the update's loss over the micro-batches: ``(loss, kl, seen)`` where
        ``seen`` are the output statistics and losses of ``stats_of`` (the lagged balance)."""
        kept = plan.measured.kept if plan.measured is not None else None
        return self.objective.accumulate_update(
            batch.pairs,
            batch.cond,
            plan.r_bar,
            kept,
            stats_of=stats_of,
            weights=(plan.c, batch.w),
            mixes=plan.mixes,
        )

    def gram_of(self, stats: Tensor | None, r: Tensor, w: Tensor) -> Tensor | None:
        """The global Gram from per-image output statistics (the lagged balance's fold)."""
        raise NotImplementedError(f"the {self.name} space has no Gram from output statistics")


class OutputSpace(GradientSpace):
    """Gradients with respect to the transformer's output ``v_theta``, in closed form."""

    name = "output"
    lags_for_free = True

    def measure(self, batch: StepBatch, need_gram: bool = True) -> Measurement:
        """Per-image statistics of the whole batch (kept forwards for the update) and its Gram."""
        stats, losses, kept = self.stats(batch.pairs, batch.cond, batch.r, need_gram, batch.w)
        return Measurement(self.gram_of(stats, batch.r, batch.w), losses, stats=stats, kept=kept)

    def stats(
        self,
        pairs: TrainingPairs,
        cond: Conditioning,
        r: Tensor,
        need_stats: bool,
        w: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, list[Forward] | None]:
        """Output-space statistics per image (summed over its timesteps) and the losses.

        One micro-batch: its forward WITH grad gives them, and is kept for the update (no extra
        cost). More: a no-grad forward of every micro-batch first (the balance needs the whole
        batch), whose ``v_old`` is kept. Returns ``(stats [N, 3], losses [K], kept forwards)``;
        ``losses`` are ``L_k = sum_p w_pk l_p(r_pk)`` over every rank (``w`` per image, the
        plain mean when None).
        """
        objective = self.objective
        chunks = pairs.chunks(self.module.hparams.micro_batch_size)
        if not need_stats:
            return None, None, None
        seen: tuple[Tensor, Tensor] | None = None
        kept: list[Forward] = []
        for mb in chunks:
            if len(chunks) == 1:  # with grad, kept for the update: no extra forward
                v_theta, v_old, v_target, kw = objective.pair_forward(pairs, mb, cond, v_old=None)
                kept.append((v_theta, v_old))
            else:
                with torch.no_grad():
                    v_theta, v_old, v_target, kw = objective.pair_forward(
                        pairs, mb, cond, v_old=None
                    )
                kept.append((None, v_old))
            seen = objective.fold_stats(seen, pairs, mb, r, (v_theta, v_old, v_target), kw, w)
        stats, loss_sum = seen
        return stats, objective.reduce_losses(loss_sum, len(pairs), w).to(r.dtype), kept

    def gram_of(self, stats: Tensor | None, r: Tensor, w: Tensor) -> Tensor | None:
        """The global output-space Gram of the batch's losses ``L_k = sum_i w_ik l_i(r_ik)``
        (balancers that use a Gram only; all ranks' samples)."""
        if not self.module.balancer.needs_gram or stats is None:
            return None
        return self.module.ranks.sum(output_gram(stats, r, weights=w))


class ParameterSpace(GradientSpace):
    """Exact LoRA-parameter gradients, one backward per reward (+ one for the KL)."""

    name = "parameters"

    def measure(self, batch: StepBatch, need_gram: bool = True) -> Measurement:
        """The per-reward gradients ``[K, P]`` and their Gram (computed whatever the balancer)."""
        grads, kl_grad, losses, kl = self.grads(batch.pairs, batch.cond, batch.r, batch.w)
        return Measurement(gram(grads), losses, grads=grads, kl_grad=kl_grad, kl=kl)

    def direction(self, measured: Measurement | None, lam: Tensor) -> Tensor | None:
        """``sum_k lambda_k g_k`` of the measured gradients (None on a step that measured none)."""
        if measured is None or measured.grads is None:
            return None
        return update_direction(measured.grads, lam.to(measured.grads.dtype))

    def apply(
        self, plan: BalancePlan, batch: StepBatch, stats_of: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """The measured direction (+ the KL gradient) as the gradient, no backward; a step
        without one (cached coefficients) backwards its combined loss as every space."""
        measured = plan.measured
        if plan.direction is None or measured is None:
            return super().apply(plan, batch, stats_of)
        assign_flat_grad(self.module.lora_params, plan.direction + measured.kl_grad)
        losses = measured.losses
        return losses.detach() @ plan.lam.to(losses.dtype), measured.kl, None

    def taps(self) -> LinearGradientTaps | None:
        """Per-sample gradient taps on the LoRA layers (``gramian`` space only)."""
        return None

    def grads(
        self, pairs: TrainingPairs, cond: Conditioning, r: Tensor, w: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Exact per-reward gradients ``[K, P]`` of the batch's losses ``L_k = sum_p w_pk
        l_p(r_pk)`` (``w [N, K]`` per image: each reward averaged over the pairs it applies to,
        global counts), the KL gradient ``[P]``, the losses ``[K]`` and the KL value; K (+1)
        backwards per micro-batch (two (+1) in ``gramian`` space). Summed over the ranks."""
        module, objective = self.module, self.objective
        hp = module.hparams
        total = float(len(pairs))
        grads = kl_grad = None
        loss_sum = torch.zeros(r.shape[1], dtype=torch.float64, device=r.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=r.device)
        taps = self.taps()
        uniform = bool((w == w.flatten()[0]).all())  # one weight for all: a plain second backward
        for mb in pairs.chunks(hp.micro_batch_size):
            with taps or contextlib.nullcontext():
                v_theta, v_old, v_target, kw = objective.pair_forward(pairs, mb, cond, v_old=None)
            rows, wts = r[pairs.image[mb]], w[pairs.image[mb]].to(r.dtype)
            kl = objective.kl(pairs, mb, cond, v_theta) / total if hp.kl_beta > 0 else None
            if taps is None:  # parameters: K (+1) backwards, one per objective
                losses = nft_loss(v_theta, v_old, v_target, rows, hp.beta, **kw)
                objectives = list((losses * wts).sum(0)) + ([kl] if kl is not None else [])
                g = parameter_grads(torch.stack(objectives), module.lora_params)
                g, g_kl = g[: r.shape[1]], (g[-1] if kl is not None else None)
            else:  # gramian: l = r a + b per pair, two (+1) backwards whatever K is
                e_pos, e_neg = nft_errors(
                    v_theta, v_old, v_target, hp.beta, **objective.error_kwargs(kw)
                )
                a, b = affine_split(e_pos, e_neg, kw.get("scale", 1.0))
                losses = rows * a.detach().unsqueeze(1) + b.detach().unsqueeze(1)
                if uniform:
                    w0 = w.flatten()[0].to(a.dtype)
                    g, g_kl = affine_reward_grads(taps, a * w0, b * w0, rows, kl)
                else:
                    g, g_kl = affine_reward_grads(taps, a, b, rows, kl, weights=wts)
            grads = g if grads is None else grads + g
            if kl is not None:
                kl_grad = g_kl if kl_grad is None else kl_grad + g_kl
                kl_sum += kl.detach().double()
            loss_sum += (losses.detach() * wts).double().sum(0)
        grads = module.ranks.sum(grads)
        kl_grad = torch.zeros_like(grads[0]) if kl_grad is None else module.ranks.mean(kl_grad)
        kl_out = kl_sum.float() if hp.kl_beta > 0 else None
        return grads, kl_grad, module.ranks.sum(loss_sum).to(r.dtype), kl_out


class GramianSpace(ParameterSpace):
    """The parameter-space gradients from two backwards whatever K is (per-sample taps)."""

    name = "gramian"

    def __init__(self, module: MarbleModule) -> None:
        super().__init__(module)
        self._taps: LinearGradientTaps | None = None

    def taps(self) -> LinearGradientTaps | None:
        """The LoRA layers' per-sample gradient taps, made on first use."""
        if self._taps is None:
            self._taps = LinearGradientTaps(self.module.transformer, self.module.lora_params)
        return self._taps

    @property
    def tap_bytes(self) -> dict[int, int]:
        """The most bytes the taps' inputs held for one micro-batch, by token count."""
        return dict(self._taps.peak_by_tokens) if self._taps is not None else {}


SPACES: dict[str, type[GradientSpace]] = {
    cls.name: cls for cls in (OutputSpace, ParameterSpace, GramianSpace)
}
"""``model.gradient_space`` -> its class."""


def build_space(name: str, module: MarbleModule) -> GradientSpace:
    """The gradient space ``name`` of ``module``."""
    return SPACES[name](module)

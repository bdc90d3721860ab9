"""Per-reward gradients in parameter or output space, update directions and cosines.

``parameters`` space is exact: K backward passes through one shared forward graph, over the
trainable parameters only. ``output`` space is the amortized form: gradients with respect to the
model output ``z = v_theta`` in closed form (:mod:`marble_pl.nft`), no backward at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from marble_pl.nft import nft_output_grad, output_gram

GradientSpace = Literal["parameters", "gramian", "output"]

__all__ = [
    "GradientSpace",
    "parameter_grads",
    "output_grads",
    "update_direction",
    "cosines",
    "output_cosines",
    "flat_grad",
    "flatten_grads",
    "assign_flat_grad",
    "masked_mean_weights",
    "affine_combination",
]


def parameter_grads(losses: Tensor, params: Sequence[Tensor], retain_graph: bool = False) -> Tensor:
    """``[K, P]`` flattened gradients ``g_k = d losses[k] / d params``, one backward each.

    The forward graph is shared; it is kept alive between the K backwards and freed after the
    last one unless ``retain_graph``. Parameters a loss does not reach get zero gradient.
    """
    if losses.ndim != 1:
        raise ValueError(f"losses must be [K] scalars, one per reward, got {tuple(losses.shape)}")
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: attach LoRA (or unfreeze something) first")
    rows = []
    k = losses.shape[0]
    for i in range(k):
        grads = torch.autograd.grad(
            losses[i], params, retain_graph=retain_graph or i < k - 1, allow_unused=True
        )
        rows.append(flatten_grads(grads, params))
    return torch.stack(rows)


def flatten_grads(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """One ``[P]`` vector of per-parameter gradients (zeros for ``None``: unused parameters)."""
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def output_grads(
    v_theta: Tensor,
    v_old: Tensor,
    v_target: Tensor,
    r: Tensor,
    beta: float,
    **loss_kwargs: object,
) -> Tensor:
    """``[K, N * D]`` per-reward gradients of the summed NFT loss w.r.t. the model output."""
    if r.ndim != 2:
        raise ValueError(f"r must be [N, K] for per-reward gradients, got {tuple(r.shape)}")
    g = nft_output_grad(v_theta, v_old, v_target, r, beta, **loss_kwargs)  # type: ignore[arg-type]
    return g.reshape(r.shape[1], -1)


def update_direction(grads: Tensor, weights: Tensor) -> Tensor:
    """``d = sum_k lambda_k g_k`` for ``[K, P]`` gradients and ``[K]`` coefficients."""
    if weights.shape != grads.shape[:1]:
        raise ValueError(
            f"need one coefficient per gradient: {grads.shape[0]} gradients, weights {tuple(weights.shape)}"
        )
    with torch.autocast(grads.device.type, enabled=False):  # in grads' dtype, not autocast's
        return weights.to(grads.dtype) @ grads


def masked_mean_weights(mask: Tensor, n_valid: Tensor) -> Tensor:
    """``[N, K]`` loss weights ``w_ik = mask_ik / n_valid_k`` (0 where ``n_valid_k == 0``).

    ``L_k = sum_i w_ik l_i`` is reward ``k``'s loss averaged over the samples it applies to
    (the paper authors' ``loss_mask``, sum / n_valid). ``n_valid`` is the GLOBAL count (every
    micro-batch, timestep and data-parallel rank), so summing the ranks' ``L_k`` gives the mean
    over the global batch's valid samples: 2 processes equal 1.
    """
    if mask.ndim != 2 or n_valid.shape != mask.shape[1:]:
        raise ValueError(
            f"need mask [N, K] and n_valid [K], got {tuple(mask.shape)} and {tuple(n_valid.shape)}"
        )
    n = n_valid.to(torch.float64)
    inv = torch.where(n > 0, 1.0 / n.clamp_min(1.0), torch.zeros_like(n))
    return mask.to(torch.float64) * inv.to(mask.device)


def affine_combination(r: Tensor, weights: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """``(r_bar [N], c [N])`` with ``sum_k lam_k L_k = sum_i c_i l_i(r_bar_i)`` (+ constants).

    Each reward's loss ``L_k = sum_i w_ik l_i(r_ik)`` has its own weights (its own valid samples
    and denominator, :func:`masked_mean_weights`). Because the per-sample loss is affine in
    ``r``, ``l_i(r) = r a_i + b_i``, the combination is one loss per sample again:
    ``sum_k lam_k w_ik (r_ik a_i + b_i) = c_i (r_bar_i a_i + b_i)`` with ``c_i = sum_k lam_k
    w_ik`` and ``r_bar_i = sum_k lam_k w_ik r_ik / c_i``, a convex combination of the ``r_ik``
    for ``lam >= 0`` (so in ``[0, 1]``). Where ``c_i = 0`` (no reward with weight applies)
    ``r_bar_i = 0.5``. So ``d = sum_k lam_k g_k`` is ONE backward of ``sum_i c_i l_i(r_bar_i)``.
    """
    if r.shape != weights.shape or lam.shape != r.shape[1:]:
        raise ValueError(
            f"need r and weights [N, K] and lam [K], got {tuple(r.shape)}, "
            f"{tuple(weights.shape)} and {tuple(lam.shape)}"
        )
    lw = weights.to(torch.float64) * lam.to(device=r.device, dtype=torch.float64)
    c = lw.sum(1)
    num = (lw * r.to(torch.float64)).sum(1)
    r_bar = torch.where(c != 0, num / torch.where(c != 0, c, torch.ones_like(c)), 0.5)
    return r_bar.to(r.dtype), c.to(r.dtype)


def cosines(grads: Tensor, direction: Tensor, eps: float = 1e-30) -> Tensor:
    """Cosine of each ``g_k`` with ``direction``; 0 where either vector is zero."""
    g = grads.double()
    d = direction.double().reshape(-1)
    dots = g @ d
    norms = g.norm(dim=1) * d.norm()
    return torch.where(norms > eps, dots / norms.clamp_min(eps), torch.zeros_like(dots))


def flat_grad(params: Sequence[Tensor]) -> Tensor:
    """The ``.grad`` of ``params`` flattened into one vector (zeros where missing)."""
    return flatten_grads([p.grad for p in params], params)


def assign_flat_grad(params: Sequence[Tensor], flat: Tensor) -> None:
    """Write a flat ``[P]`` vector into the ``.grad`` of ``params`` (for the optimizer step)."""
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat gradient has {flat.numel()} entries, parameters need {offset}")


def output_cosines(
    stats: Tensor,
    r: Tensor,
    directions: Tensor,
    reduce: Callable[[Tensor], Tensor] | None = None,
    weights: Tensor | None = None,
    direction_weights: Tensor | None = None,
) -> Tensor:
    """``[K, J]`` cosines between per-reward output-space gradients and J update directions.

    Every vector here is an output-space NFT gradient ``dl(r)/dz`` for some ``r``: the K rewards'
    columns of ``r [N, K]`` and the directions' columns of ``directions [N, J]``. Their inner
    products come from the per-sample ``stats`` (:func:`~marble_pl.nft.nft_output_stats`), so no
    gradient is materialised; ``reduce`` sums the partial Grams over data-parallel ranks.
    ``weights`` ``[N, K]`` and ``direction_weights`` ``[N, J]`` are the columns' per-sample loss
    weights (:func:`~marble_pl.nft.output_gram`; uniform when None).
    """
    reduce = reduce or (lambda x: x)
    if directions.ndim == 1:
        directions = directions.unsqueeze(1)
    if direction_weights is not None and direction_weights.ndim == 1:
        direction_weights = direction_weights.unsqueeze(1)
    wk = {} if weights is None else {"weights": weights}
    wd = {} if direction_weights is None else {"weights": direction_weights}
    cross = reduce(
        output_gram(stats, r, directions, weights=weights, weights_other=direction_weights)
    )
    norms_k = reduce(torch.diagonal(output_gram(stats, r, **wk)).contiguous()).clamp_min(0).sqrt()
    norms_d = (
        reduce(torch.diagonal(output_gram(stats, directions, **wd)).contiguous())
        .clamp_min(0)
        .sqrt()
    )
    denom = norms_k.unsqueeze(1) * norms_d.unsqueeze(0)
    return torch.where(denom > 0, cross / denom.clamp_min(1e-300), torch.zeros_like(cross))

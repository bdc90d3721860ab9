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
    return weights.to(grads.dtype) @ grads


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
) -> Tensor:
    """``[K, J]`` cosines between per-reward output-space gradients and J update directions.

    Every vector here is an output-space NFT gradient ``dl(r)/dz`` for some ``r``: the K rewards'
    columns of ``r [N, K]`` and the directions' columns of ``directions [N, J]``. Their inner
    products come from the per-sample ``stats`` (:func:`~marble_pl.nft.nft_output_stats`), so no
    gradient is materialised; ``reduce`` sums the partial Grams over data-parallel ranks.
    """
    reduce = reduce or (lambda x: x)
    if directions.ndim == 1:
        directions = directions.unsqueeze(1)
    cross = reduce(output_gram(stats, r, directions))
    norms_k = reduce(torch.diagonal(output_gram(stats, r)).contiguous()).clamp_min(0).sqrt()
    norms_d = (
        reduce(torch.diagonal(output_gram(stats, directions)).contiguous()).clamp_min(0).sqrt()
    )
    denom = norms_k.unsqueeze(1) * norms_d.unsqueeze(0)
    return torch.where(denom > 0, cross / denom.clamp_min(1e-300), torch.zeros_like(cross))

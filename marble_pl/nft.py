"""The DiffusionNFT loss and its closed-form gradient with respect to the model output.

Notation (ARCHITECTURE §2 step 4): ``x_t = (1 - t) x0 + t eps``, target ``v* = eps - x0``,
``v+ = (1 - beta) v_old + beta v_theta``, ``v- = (1 + beta) v_old - beta v_theta`` and per sample
``l_i(r) = scale * (r * e+_i + (1 - r) * e-_i)``.

Errors ``e+-`` come in two forms, both independent of ``r`` so that ``l`` is affine in ``r``:

* plain (``t=None``): ``e+- = mean over dims of (v+- - v*)^2``;
* DiffusionNFT's reference form (``t`` given, ``adaptive_weight=True``, ``scale = a_max / beta``):
  the error is taken in x0 space, ``x0_hat - x0 = -t (v+- - v*)``, and divided per sample by the
  detached weight ``clip(mean |x0_hat - x0|, min=1e-5)``.

Because ``l`` is affine in ``r`` and ``r`` does not touch ``theta``, per-reward gradients with
respect to the output ``z = v_theta`` are one elementwise expression, and their Gram needs only
three inner products per sample (:func:`nft_output_stats`, :func:`output_gram`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from marble_pl.ranges import check_beta

__all__ = [
    "nft_errors",
    "nft_loss",
    "nft_output_grad",
    "nft_output_stats",
    "output_gram",
    "check_beta",
]

_MIN_WEIGHT = 1e-5


def _dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _expand_t(t: Tensor, like: Tensor) -> Tensor:
    t = t.to(like.dtype).reshape(-1)
    if t.numel() == 1:
        t = t.expand(like.shape[0])
    if t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have one value per sample ({like.shape[0]}), got {t.numel()}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _residuals(
    v_theta: Tensor, v_old: Tensor, v_target: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """``(v+ - v*, v- - v*)`` with ``v_old`` treated as a constant."""
    check_beta(beta)
    if v_theta.shape != v_old.shape or v_theta.shape != v_target.shape:
        raise ValueError(
            "v_theta, v_old and v_target must share one shape, got "
            f"{tuple(v_theta.shape)}, {tuple(v_old.shape)}, {tuple(v_target.shape)}"
        )
    v_old = v_old.detach()
    v_target = v_target.detach()
    pos = (1 - beta) * v_old + beta * v_theta - v_target
    neg = (1 + beta) * v_old - beta * v_theta - v_target
    return pos, neg


def _coefficients(
    pos: Tensor, neg: Tensor, t: Tensor | None, adaptive_weight: bool
) -> tuple[Tensor, Tensor]:
    """Per-sample factors ``c+-`` such that ``e+- = c+- * mean((v+- - v*)^2)`` (detached)."""
    n = pos.shape[0]
    one = torch.ones(n, dtype=pos.dtype, device=pos.device)
    if t is None:
        if adaptive_weight:
            raise ValueError("adaptive_weight=True needs the timesteps t (x0-space error)")
        return one, one
    tt = _expand_t(t, pos)
    c = tt.reshape(n).square()
    if not adaptive_weight:
        return c, c
    with torch.no_grad():
        w_pos = (tt * pos).abs().mean(dim=_dims(pos)).clamp_min(_MIN_WEIGHT)
        w_neg = (tt * neg).abs().mean(dim=_dims(neg)).clamp_min(_MIN_WEIGHT)
    return c / w_pos, c / w_neg


def nft_errors(
    v_theta: Tensor,
    v_old: Tensor,
    v_target: Tensor,
    beta: float,
    *,
    t: Tensor | None = None,
    adaptive_weight: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-sample errors ``(e+, e-)``, each ``[N]``; they do not depend on ``r``."""
    pos, neg = _residuals(v_theta, v_old, v_target, beta)
    c_pos, c_neg = _coefficients(pos, neg, t, adaptive_weight)
    e_pos = c_pos * pos.square().mean(dim=_dims(pos))
    e_neg = c_neg * neg.square().mean(dim=_dims(neg))
    return e_pos, e_neg


def _check_r(r: Tensor, n: int) -> Tensor:
    if r.ndim not in (1, 2) or r.shape[0] != n:
        raise ValueError(f"r must be [N] or [N, K] with N={n}, got shape {tuple(r.shape)}")
    return r.detach()


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    v_target: Tensor,
    r: Tensor,
    beta: float,
    *,
    t: Tensor | None = None,
    adaptive_weight: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """Per-sample DiffusionNFT loss ``scale * (r e+ + (1 - r) e-)``.

    ``r`` of shape ``[N]`` gives ``[N]``; ``r`` of shape ``[N, K]`` gives ``[N, K]``, one column
    per reward, all sharing the one forward pass that produced ``v_theta``.
    """
    e_pos, e_neg = nft_errors(v_theta, v_old, v_target, beta, t=t, adaptive_weight=adaptive_weight)
    r = _check_r(r, v_theta.shape[0]).to(e_pos.dtype)
    if r.ndim == 2:
        e_pos, e_neg = e_pos.unsqueeze(1), e_neg.unsqueeze(1)
    return scale * (r * e_pos + (1 - r) * e_neg)


def _grad_parts(
    v_theta: Tensor,
    v_old: Tensor,
    v_target: Tensor,
    beta: float,
    t: Tensor | None,
    adaptive_weight: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``(u, w)`` with ``dl_i/dz_i = r * u_i - (1 - r) * w_i`` (the constant folded in)."""
    with torch.no_grad():
        pos, neg = _residuals(v_theta.detach(), v_old, v_target, beta)
        c_pos, c_neg = _coefficients(pos, neg, t, adaptive_weight)
        d = pos[0].numel()
        k = 2.0 * beta * scale / d
        shape = (-1, *([1] * (pos.ndim - 1)))
        u = (k * c_pos).reshape(shape) * pos
        w = (k * c_neg).reshape(shape) * neg
    return u, w


def nft_output_grad(
    v_theta: Tensor,
    v_old: Tensor,
    v_target: Tensor,
    r: Tensor,
    beta: float,
    *,
    t: Tensor | None = None,
    adaptive_weight: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """Closed-form ``d nft_loss(...).sum() / d v_theta`` (no backward pass).

    ``dl_i/dz_i = 2 beta scale / D * (r c+ (v+ - v*) - (1 - r) c- (v- - v*))``. Returns a tensor
    shaped like ``v_theta`` for ``r`` of shape ``[N]``, and ``[K, *v_theta.shape]`` for ``[N, K]``.
    """
    u, w = _grad_parts(v_theta, v_old, v_target, beta, t, adaptive_weight, scale)
    r = _check_r(r, v_theta.shape[0]).to(u.dtype)
    if r.ndim == 1:
        rr = r.reshape(-1, *([1] * (u.ndim - 1)))
        return rr * u - (1 - rr) * w
    rr = r.t().reshape(r.shape[1], r.shape[0], *([1] * (u.ndim - 1)))
    return rr * u.unsqueeze(0) - (1 - rr) * w.unsqueeze(0)


def nft_output_stats(
    v_theta: Tensor,
    v_old: Tensor,
    v_target: Tensor,
    beta: float,
    *,
    t: Tensor | None = None,
    adaptive_weight: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """Per-sample inner products ``[N, 3] = (|a|^2, <a, w>, |w|^2)`` with ``a = u + w``.

    Since ``dl_i/dz_i = r a_i - w_i``, these three numbers give every inner product between
    output-space gradients for any ``r`` (:func:`output_gram`) in O(N D) work, whatever K is.
    """
    u, w = _grad_parts(v_theta, v_old, v_target, beta, t, adaptive_weight, scale)
    a = (u + w).flatten(1).double()
    w = w.flatten(1).double()
    return torch.stack([(a * a).sum(1), (a * w).sum(1), (w * w).sum(1)], dim=1)


def output_gram(
    stats: Tensor,
    r: Tensor,
    r_other: Tensor | None = None,
    *,
    weights: Tensor | None = None,
    weights_other: Tensor | None = None,
) -> Tensor:
    """Output-space Gram ``M[j, k] = sum_i <dl_i(r_ij)/dz_i, dl_i(r_ik)/dz_i>``.

    ``stats`` from :func:`nft_output_stats`, ``r`` is ``[N, K]``; with ``r_other`` ``[N, J]`` the
    cross-Gram ``[K, J]`` is returned instead (for cosines against an update direction). Sums over
    samples, so it adds up across data-parallel ranks. ``weights`` (``[N, K]``, and
    ``weights_other`` ``[N, J]`` for ``r_other``; ones when None) weigh each sample's loss per
    column, ``L_k = sum_i w_ik l_i(r_ik)``: a reward's loss averaged over the samples it applies
    to has ``w_ik = 1 / n_k`` there and 0 elsewhere.
    """
    r = _check_r(r, stats.shape[0]).to(stats.dtype)
    s = r if r_other is None else _check_r(r_other, stats.shape[0]).to(stats.dtype)
    if r.ndim == 1:
        r = r.unsqueeze(1)
    if s.ndim == 1:
        s = s.unsqueeze(1)
    aa, aw, ww = stats[:, 0], stats[:, 1], stats[:, 2]
    if weights is None and weights_other is None:
        return (
            r.t() @ (aa.unsqueeze(1) * s)
            - (r * aw.unsqueeze(1)).sum(0).unsqueeze(1)
            - (s * aw.unsqueeze(1)).sum(0).unsqueeze(0)
            + ww.sum()
        )
    # dL_k/dz_i = w_ik (r_ik a_i - w_i): bilinear in (w r, w) per sample
    wr = _column_weights(weights, r)
    ws = wr if r_other is None else _column_weights(weights_other, s)
    pr, ps = wr * r, ws * s
    return (
        pr.t() @ (aa.unsqueeze(1) * ps)
        - pr.t() @ (aw.unsqueeze(1) * ws)
        - wr.t() @ (aw.unsqueeze(1) * ps)
        + wr.t() @ (ww.unsqueeze(1) * ws)
    )


def _column_weights(weights: Tensor | None, like: Tensor) -> Tensor:
    """Per-sample, per-column loss weights shaped like ``like`` ``[N, J]`` (ones when None)."""
    if weights is None:
        return torch.ones_like(like)
    w = weights.detach().to(like.dtype)
    w = w.unsqueeze(1) if w.ndim == 1 else w
    if w.shape != like.shape:
        raise ValueError(f"weights must be shaped like r {tuple(like.shape)}, got {tuple(w.shape)}")
    return w

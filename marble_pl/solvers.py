"""Deterministic ODE steps on the flow-matching sigmas, as pure functions on tensors.

Flow matching (SD3): ``x_s = (1 - s) x0 + s eps``, velocity ``v = eps - x0``, sampled from
``s = 1`` down to ``s = 0``. In DPM-Solver's notation ``alpha_s = 1 - s``, ``sigma_s = s`` and
``lambda_s = log(alpha_s / sigma_s)``; the data prediction is ``x0_hat = x - s v``.

* :func:`euler_step`: ``x' = x + (s' - s) v`` (first order; what diffusers'
  ``FlowMatchEulerDiscreteScheduler.step`` does without noise).
* :func:`dpm2_step`: DiffusionNFT's ``solver="dpm2"`` (the official MARBLE recipe's rollouts):
  multistep DPM-Solver++(2M) in data prediction (Lu et al. 2022, arXiv:2211.01095, eq. 2M with
  the midpoint ``D1``), first order on the first step (no earlier prediction yet) and on the last
  (``lower_order_final``). Coefficients are computed in float64 from the sigmas, then applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

__all__ = ["SOLVERS", "dpm2_step", "euler_step", "first_order_coefficients"]

SOLVERS = ("euler", "dpm2")
"""Deterministic samplers a rollout can use (``model.solver``)."""


def euler_step(x: Tensor, v: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One Euler step of ``dx/ds = v`` from ``sigma`` to ``sigma_next``."""
    return x + (sigma_next - sigma) * v


def first_order_coefficients(sigma: float, sigma_next: float) -> tuple[float, float]:
    """``(c_x, c_0)`` of the DPM-Solver++ first-order step ``x' = c_x x + c_0 x0_hat``.

    ``c_x = sigma'/sigma`` and ``c_0 = alpha' (1 - e^{-h}) = alpha' - sigma' alpha / sigma``
    (``e^{-h} = sigma' alpha / (alpha' sigma)``), finite at ``sigma = 1`` and ``sigma' = 0``
    where ``lambda`` is infinite. In exact arithmetic it equals the Euler step (and DDIM's).
    """
    alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
    return sigma_next / sigma, alpha_next - sigma_next * alpha / sigma


def _lambda(sigma: float) -> float:
    """``log(alpha / sigma)``, ``-inf`` at ``sigma = 1`` and ``+inf`` at ``sigma = 0``."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log((1.0 - sigma) / sigma)


def dpm2_step(
    x: Tensor, v: Tensor, sigmas: Sequence[float] | Tensor, i: int, x0_prev: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Step ``i`` of the DPM-Solver++(2M) flow sampler: ``(x at sigmas[i+1], x0_hat)``.

    ``sigmas`` is the whole schedule, ``len = steps + 1``, ending with the final sigma (0);
    ``v`` the velocity at ``(x, sigmas[i])``; ``x0_prev`` the ``x0_hat`` that step ``i - 1``
    returned (None at ``i = 0``). Pass the returned ``x0_hat`` to the next step. Steps ``0`` and
    ``steps - 1`` are first order; the others add ``0.5 c_0 D1`` with ``D1 = (h / h_0)
    (x0_hat - x0_prev)``, ``h = lambda_{i+1} - lambda_i``, ``h_0 = lambda_i - lambda_{i-1}``
    (``D1 = 0`` when ``sigmas[i-1] = 1``, where ``h_0`` is infinite).
    """
    s = [float(value) for value in sigmas]
    steps = len(s) - 1
    if not 0 <= i < steps:
        raise ValueError(f"step index {i} out of range for a schedule of {steps} steps.")
    x0 = x - s[i] * v
    c_x, c_0 = first_order_coefficients(s[i], s[i + 1])
    x_next = c_x * x + c_0 * x0
    if 0 < i < steps - 1:
        if x0_prev is None:
            raise ValueError(f"dpm2_step {i} needs x0_prev, the x0_hat step {i - 1} returned.")
        h = _lambda(s[i + 1]) - _lambda(s[i])
        h_0 = _lambda(s[i]) - _lambda(s[i - 1])
        ratio = h / h_0  # 0 when h_0 is infinite (sigmas[i-1] = 1)
        if ratio != 0.0:
            x_next = x_next + (0.5 * c_0 * ratio) * (x0 - x0_prev)
    return x_next, x0

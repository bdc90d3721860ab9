"""Coefficients whose update keeps every reward's cosine at or above a margin (the EMA guard).

``cos_k(lambda) = (M lambda)_k / (sqrt(M_kk) ||G^T lambda||)`` with ``||G^T lambda||^2 =
lambda^T M lambda``: only the Gram is needed. The set ``C = {lambda in simplex : cos_k >= margin
for every k}`` is convex (second-order cones) but not polyhedral, so OSQP cannot project onto it
directly. :func:`project_to_margin_set` projects onto polyhedra that contain ``C`` (outer
approximations, Kelley's cutting planes), all of whose constraints are linear:

* ``(M lambda)_k >= margin sqrt(M_kk) ||d*||``: no point of the simplex gives an update shorter
  than the min-norm one ``d*``;
* tangent planes of ``margin sqrt(M_kk) ||G^T lambda|| - (M lambda)_k <= 0`` (convex) at
  ``lambda_bar`` and at every earlier answer that missed the margin.

An answer that meets the margin (exact cosines, up to :data:`COS_TOL`) is the projection onto
``C`` (the nearest point of a larger set, inside ``C``); an empty polyhedron proves that no
coefficients meet the margin (then ``lambda*`` is applied and the step is flagged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import osqp
import scipy.sparse as sp
from torch import Tensor

from marble_pl.balance import PROJECTION_SETTINGS, min_norm_coefficients, project_to_safe_set

__all__ = ["MarginProjection", "COS_TOL", "update_cosines", "project_to_margin_set"]

#: Slack of the exact cosine check (OSQP solves to ``eps = 1e-9`` on a Gram scaled to unit mean
#: diagonal; the cosine's round-off is far below this).
COS_TOL = 1e-6


@dataclass(frozen=True)
class MarginProjection:
    """The coefficients to apply and how they were found.

    ``status``: ``kept`` (``lambda_bar`` already met the margin), ``projected`` (moved until it
    does: checked with the exact cosines) or ``infeasible`` (no point found that meets it:
    ``lambda*``, the fallback, is returned and the step should be flagged). ``min_cos``: the
    smallest cosine of the returned coefficients' update with a reward's gradient.
    """

    weights: np.ndarray
    status: Literal["kept", "projected", "infeasible"]
    min_cos: float


def _as_gram(gram: np.ndarray | Tensor) -> np.ndarray:
    m = gram.detach().double().cpu().numpy() if isinstance(gram, Tensor) else gram
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"the Gram must be a square matrix, got shape {m.shape}")
    return m


def update_cosines(gram: np.ndarray | Tensor, weights: np.ndarray) -> np.ndarray:
    """``cos(g_k, G^T w)`` for every reward from the Gram alone, ``[K]``.

    A reward with a zero gradient has no direction to push: its cosine is ``+inf`` (it never
    binds). A zero update has cosine 0 with every reward (no progress).
    """
    m = _as_gram(gram)
    w = np.asarray(weights, dtype=np.float64)
    inner = m @ w
    norm = float(np.sqrt(max(float(w @ inner), 0.0)))
    diag = np.sqrt(np.clip(np.diag(m), 0.0, None))
    out = np.full(w.shape, np.inf)
    live = diag > 0.0
    out[live] = inner[live] / (diag[live] * norm) if norm > 0.0 else 0.0
    return out


def _project_polyhedral(
    bar: np.ndarray, rows: np.ndarray, low: np.ndarray
) -> tuple[np.ndarray | None, bool]:
    """Euclidean projection of ``bar`` onto ``{simplex, rows @ lambda >= low}`` by OSQP:
    ``(lambda, empty)``; ``empty`` when OSQP proved the set empty (primal infeasible). An
    inaccurate answer is returned too (the caller checks every answer's exact cosines); None
    when there is no finite one."""
    k = bar.size
    a = sp.csc_matrix(np.vstack([np.ones((1, k)), np.eye(k), rows]))
    lo = np.concatenate([[1.0], np.zeros(k), low])
    hi = np.concatenate([[1.0], np.full(k + rows.shape[0], np.inf)])
    try:
        solver = osqp.OSQP(algebra="builtin")
        solver.setup(P=sp.identity(k, format="csc"), q=-bar, A=a, l=lo, u=hi, **PROJECTION_SETTINGS)
        result = solver.solve(raise_error=False)
    except Exception:  # a failing OSQP must not stop training: the caller falls back
        return None, False
    status = str(result.info.status)
    x = np.asarray(result.x, dtype=np.float64)
    if status == "primal infeasible":
        return None, True
    if not np.all(np.isfinite(x)) or "infeasible" in status:
        return None, False
    x = np.clip(x, 0.0, None)
    return (x / x.sum(), False) if x.sum() > 0 else (None, False)


def _cuts(m: np.ndarray, at: np.ndarray, margin: float, diag: np.ndarray) -> np.ndarray:
    """Rows of linear constraints ``rows @ lambda >= 0`` that every point of ``C`` meets: the
    tangent planes at ``at`` of the convex ``h_k = margin sqrt(M_kk) ||G^T lambda|| - (M
    lambda)_k <= 0``, that is ``(M lambda)_k >= margin sqrt(M_kk) <d_at, d_lambda> / ||d_at||``
    (rewards with a zero gradient left out)."""
    ma = m @ at
    norm = float(np.sqrt(max(float(at @ ma), 0.0)))
    live = diag > 0.0
    if norm == 0.0:
        return m[live]
    return m[live] - margin * diag[live, None] * ma[None, :] / norm


def project_to_margin_set(
    lambda_bar: np.ndarray,
    gram: np.ndarray | Tensor,
    margin: float,
    fallback: np.ndarray | None = None,
    max_rounds: int = 50,
) -> MarginProjection:
    """Nearest coefficients to ``lambda_bar`` whose update has ``cos(g_k, d) >= margin`` for all k.

    ``margin = 0`` is :func:`~marble_pl.balance.project_to_safe_set` (``M lambda >= 0``). For
    ``margin > 0`` see the module docstring (outer approximations by linear cuts, projected onto
    by OSQP, at most ``max_rounds``). When an outer approximation is empty no coefficients meet
    the margin: ``lambda*`` (``fallback``; solved here when None) is returned with status
    ``infeasible``; its cosines are ``>= ||d*|| / ||g_k||``, all positive unless ``d* = 0``.
    If the cuts have not converged after ``max_rounds``, the point nearest the last one on
    the segment to ``lambda*`` that meets the margin (when ``lambda*`` does; else
    ``infeasible``). Guaranteed: a ``kept`` or ``projected`` answer meets the margin up to
    :data:`COS_TOL` (checked with the exact cosines).
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    m = _as_gram(gram)
    k = m.shape[0]
    bar = np.asarray(lambda_bar, dtype=np.float64)
    if bar.shape != (k,):
        raise ValueError(f"lambda_bar has shape {bar.shape}, expected ({k},) for a {k}x{k} Gram")
    star = min_norm_coefficients(m).weights if fallback is None else fallback
    star = np.asarray(star, dtype=np.float64)

    def result(w: np.ndarray, status: str) -> MarginProjection:
        cos = float(np.min(update_cosines(m, w)))
        return MarginProjection(w.copy(), status, cos)  # type: ignore[arg-type]

    if float(np.min(update_cosines(m, bar))) >= margin - COS_TOL:
        return result(bar, "kept")
    if margin == 0.0:
        return result(project_to_safe_set(bar, m, fallback=star), "projected")
    diag = np.sqrt(np.clip(np.diag(m), 0.0, None))
    live = diag > 0.0
    scale = float(np.trace(m)) / k  # rows in units of the mean squared gradient norm
    rho = float(np.sqrt(max(float(star @ m @ star), 0.0)))  # ||d*||: no update is shorter
    rows = np.vstack([m[live], _cuts(m, bar, margin, diag)]) / scale
    low = np.concatenate([margin * rho * diag[live], np.zeros(int(live.sum()))]) / scale
    last = bar
    for _ in range(max_rounds):
        lam, empty = _project_polyhedral(bar, rows, low)
        if empty:  # an outer approximation of C is empty: so is C
            return result(star, "infeasible")
        if lam is None:
            break
        if float(np.min(update_cosines(m, lam))) >= margin - COS_TOL:
            return result(lam, "projected")
        last = lam
        missed = update_cosines(m, lam)[live] < margin - COS_TOL  # cut only where it binds
        cut = _cuts(m, lam, margin, diag)[missed] / scale
        rows, low = np.vstack([rows, cut]), np.concatenate([low, np.zeros(cut.shape[0])])
    if float(np.min(update_cosines(m, star))) >= margin - COS_TOL:
        return result(_segment_to(m, last, star, margin), "projected")
    return result(star, "infeasible")


def _segment_to(m: np.ndarray, start: np.ndarray, safe: np.ndarray, margin: float) -> np.ndarray:
    """The point nearest ``start`` on the segment to ``safe`` (which meets the margin) that meets
    it too, by bisection on the exact cosines (60 halvings: float precision)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        t = 0.5 * (lo + hi)
        if float(np.min(update_cosines(m, (1 - t) * start + t * safe))) >= margin:
            hi = t
        else:
            lo = t
    return (1 - hi) * start + hi * safe

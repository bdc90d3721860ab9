"""Balancing per-reward gradients: Gram matrix -> coefficients ``lambda_`` on the simplex.

Knows nothing of Lightning or models (ARCHITECTURE §2 steps 6-7). The MARBLE balancer solves the
MGDA min-norm problem ``lambda* = argmin_{lambda in simplex} lambda^T M lambda`` with OSQP; its
direction ``d = sum_k lambda_k g_k`` satisfies ``<g_k, d> >= ||d||^2 >= 0`` for every reward ``k``
(no reward is pushed backwards). Baselines (fixed weights, single reward) share the interface.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import osqp
import scipy.sparse as sp
from torch import Tensor

__all__ = [
    "BalanceResult",
    "Balancer",
    "MinNormSolver",
    "FixedWeights",
    "SingleReward",
    "EMA",
    "gram",
    "min_norm_coefficients",
    "frank_wolfe_min_norm",
    "zero_gradient_vertex",
    "unit_diagonal_scaling",
    "project_to_safe_set",
    "step_towards_safe",
    "PROJECTION_SETTINGS",
    "ZERO_GRADIENT_RTOL",
    "conflicts",
    "gradient_scales",
    "rescale_gram",
    "to_raw_weights",
    "applied_weights",
    "BalanceCadence",
    "project_to_simplex",
    "GRAD_EPS",
    "active_rewards",
]

Normalization = Literal["none", "l2", "unit", "loss"]
"""How gradients are scaled before the QP (:func:`gradient_scales`) and how its weights are
applied (:func:`applied_weights`): ``l2`` and ``unit`` solve the same QP on unit-norm gradients;
``l2`` applies the weights giving that direction on the raw gradients, ``unit`` (the paper
authors' ``normalize_grads``) applies the QP's alpha itself to the raw per-reward advantages."""


@dataclass(frozen=True)
class BalanceResult:
    """Coefficients and how they were obtained.

    ``status`` is OSQP's status string (``"solved"``, ``"solved inaccurate"``, ...) or one of
    ``"single"`` (K = 1), ``"zero_gram"`` (all gradients zero: uniform weights),
    ``"zero_gradient"`` (some gradient is zero: its vertex is the exact min-norm point, ``d = 0``,
    no QP needed, ``fallback=False``), ``"fixed"``. ``fallback`` is True when the weights did not
    come from a solved QP or an exact answer.
    """

    weights: np.ndarray
    status: str
    solve_seconds: float
    fallback: bool
    active: np.ndarray | None = None
    """``[K]`` bool: the rewards that took part in the QP (None: all of them)."""


class Balancer(Protocol):
    """Maps a ``[K, K]`` Gram matrix to coefficients on the simplex."""

    def __call__(self, gram: np.ndarray) -> BalanceResult: ...


def gram(grads: Tensor) -> Tensor:
    """Gram matrix ``M[j, k] = <g_j, g_k>`` of ``[K, P]`` gradients, in float64 for the QP."""
    if grads.ndim != 2:
        raise ValueError(f"grads must be [K, P], got shape {tuple(grads.shape)}")
    g = grads.double()
    return g @ g.t()


#: A reward whose gradient norm is at most this (or not finite) leaves the QP with weight 0, as
#: in the paper authors' code (``grad_eps``): a gradient of the batch's mean loss that small
#: carries no direction worth balancing.
GRAD_EPS = 1e-12


def active_rewards(
    gram: np.ndarray | Tensor, present: np.ndarray | None = None, grad_eps: float = GRAD_EPS
) -> np.ndarray:
    """``[K]`` bool: the rewards that take part in the balance.

    A reward leaves it when it applies to no sample of the batch (``present[k]`` False), or its
    gradient norm ``sqrt(M_kk)`` is ``<= grad_eps`` or not finite (a non-finite gradient shows
    as a non-finite diagonal entry).
    """
    if isinstance(gram, Tensor):
        gram = gram.detach().double().cpu().numpy()
    m = np.asarray(gram, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"gram must be a square [K, K] matrix, got shape {m.shape}")
    diag = np.diag(m)
    keep = np.isfinite(diag) & (np.sqrt(np.abs(diag)) > grad_eps)
    if present is not None:
        present = np.asarray(present, dtype=bool)
        if present.shape != keep.shape:
            raise ValueError(f"present must be [{keep.size}] bool, got shape {present.shape}")
        keep &= present
    return keep


def project_to_simplex(x: np.ndarray) -> np.ndarray:
    """Euclidean projection onto ``{lambda >= 0, sum lambda = 1}`` (sort-based, exact)."""
    x = np.asarray(x, dtype=np.float64)
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, x.size + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    theta = css[rho] / (rho + 1.0)
    return np.maximum(x - theta, 0.0)


def _check_gram(m: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(m, Tensor):
        m = m.detach().double().cpu().numpy()
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square [K, K] matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(
            "gram contains NaN/inf: a per-reward gradient is not finite (check the rewards and "
            "the loss for NaN before balancing)"
        )
    return 0.5 * (m + m.T)


def conflicts(gram: np.ndarray | Tensor, weights: np.ndarray, rtol: float = 1e-9) -> bool:
    """Whether ``d = sum_k w_k g_k`` pushes some reward backwards: ``min_k <g_k, d> < 0``.

    ``<g_k, d> = (M w)_k``, so this needs only the Gram. ``rtol`` (relative to the mean squared
    gradient norm) absorbs round-off.
    """
    m = _check_gram(gram)
    scale = max(float(np.trace(m)) / m.shape[0], 0.0)
    return bool(np.min(m @ np.asarray(weights, dtype=np.float64)) < -rtol * scale)


def frank_wolfe_min_norm(
    m: np.ndarray, init: np.ndarray | None = None, max_iter: int = 10_000, tol: float = 1e-15
) -> np.ndarray:
    """Min-norm point on the simplex by pairwise Frank-Wolfe with exact line search.

    Moves weight from the worst vertex in the support to the best one (linear convergence on a
    polytope, unlike plain Frank-Wolfe as in Sener & Koltun's MGDA). Independent of OSQP; used as
    the fallback when OSQP does not report ``solved``.
    """
    k = m.shape[0]
    lam = np.full(k, 1.0 / k) if init is None else project_to_simplex(init)
    scale = max(float(np.trace(m)) / k, 1e-300)
    for _ in range(max_iter):
        grad = m @ lam
        s = int(np.argmin(grad))
        support = np.nonzero(lam > 0)[0]
        a = int(support[np.argmax(grad[support])])
        gap = float(grad[a] - grad[s])
        if s == a or gap <= tol * scale:
            break
        # Direction e_s - e_a; minimise the quadratic in gamma over [0, lam_a].
        curvature = float(m[s, s] + m[a, a] - 2.0 * m[s, a])
        gamma = lam[a] if curvature <= 0 else min(lam[a], gap / curvature)
        lam[s] += gamma
        lam[a] -= gamma
    return project_to_simplex(lam)


#: A gradient counts as zero when ``M_kk <= ZERO_GRADIENT_RTOL * max_j M_jj``: a norm ratio of
#: 1e-15, float64's epsilon. Its vertex then conflicts with no reward beyond
#: ``|M_jk| <= sqrt(M_jj M_kk) <= 1e-15 max_j M_jj <= K 1e-15 * mean diag``, far inside
#: :func:`conflicts`' tolerance, while norms that are merely small (1e-12 of the largest, say) are
#: still solved for.
ZERO_GRADIENT_RTOL = 1e-30


def zero_gradient_vertex(m: np.ndarray) -> int | None:
    """Index of a (numerically) zero gradient, whose vertex is an exact min-norm point, else None.

    With ``g_k = 0`` the point ``lambda = e_k`` gives ``d = 0``, the global minimum of
    ``lambda^T M lambda >= 0``; no solver is needed (and OSQP converges badly on such Grams). Of
    several zero rows the one with the smallest ``M_kk`` (then the lowest index) is taken.
    """
    diag = np.abs(np.diag(m))  # a Gram's diagonal is >= 0; |.| keeps bogus input out of here
    largest = float(np.max(diag))
    if largest <= 0.0:
        return None  # all zero: no gradient at all, the caller's "zero_gram" case
    small = diag <= ZERO_GRADIENT_RTOL * largest
    if not np.any(small):
        return None
    return int(np.argmin(np.where(small, diag, np.inf)))


def unit_diagonal_scaling(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The min-norm QP in variables ``mu`` with ``lambda = a * mu``: ``(C, a)``.

    ``n_k = sqrt(M_kk)`` (all positive), ``a_k = min(n) / n_k`` in ``(0, 1]`` and ``C = M /
    (n n^T)``, the unit-diagonal cosine matrix; then ``lambda^T M lambda = min(n)^2 mu^T C mu``,
    ``sum lambda = a^T mu`` and ``lambda >= 0 <=> mu >= 0``. On gradients whose norms span many
    decades the optimal ``lambda`` does too (weights ~1e-12 on large gradients matter), below
    OSQP's absolute tolerance; ``mu = lambda * n / min(n)`` is of order one instead.
    """
    n = np.sqrt(np.abs(np.diag(m)))  # |.|: a non-Gram keeps its negative (non-convex) diagonal
    a = float(np.min(n)) / n
    return m / np.outer(n, n), a


def _simplex_from_scaled(x: np.ndarray, a: np.ndarray) -> np.ndarray | None:
    """``lambda = a * mu`` clipped at 0 and divided by its sum (None if not finite or all zero).

    Division, not :func:`project_to_simplex`: subtracting a common shift would wipe out the tiny
    but significant weights of a badly scaled Gram.
    """
    lam = np.clip(a * x, 0.0, None)
    total = float(lam.sum())
    if not (np.all(np.isfinite(lam)) and np.isfinite(total) and total > 0.0):
        return None
    return lam / total


#: OSQP's "adapt rho every ``adaptive_rho_interval`` iterations" mode (``OSQP_ADAPTIVE_RHO_UPDATE_
#: ITERATIONS``). Pinned: the alternatives (``2``, time based; ``adaptive_rho_interval=0`` before
#: osqp 1.0) adapt rho after a fraction of the measured setup *time*, which makes the iterates,
#: and so the last bits of the coefficients, depend on the machine's load.
ADAPTIVE_RHO_ITERATIONS = 1


@dataclass(frozen=True)
class _QPStructure:
    """The parts of the QP that depend only on K: index patterns of triu(P) and A, and l, u."""

    k: int
    rows: np.ndarray
    indptr: np.ndarray
    cols: np.ndarray
    a_rows: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    @classmethod
    def for_k(cls, k: int) -> _QPStructure:
        """Constraints ``a^T x = 1`` (row 0) and ``x >= 0`` (rows 1..K); dense triu(P)."""
        return cls(
            k=k,
            rows=np.concatenate([np.arange(j + 1) for j in range(k)]),
            indptr=np.concatenate([[0], np.cumsum(np.arange(1, k + 1))]),
            cols=np.concatenate([np.full(j + 1, j) for j in range(k)]),
            a_rows=np.stack([np.zeros(k, dtype=np.int64), np.arange(1, k + 1)], axis=1).ravel(),
            lower=np.concatenate([[1.0], np.zeros(k)]),
            upper=np.concatenate([[1.0], np.full(k, np.inf)]),
        )

    def p_upper(self, m: np.ndarray) -> sp.csc_matrix:
        """``P = 2 M`` as its dense upper triangle in CSC form."""
        k = self.k
        return sp.csc_matrix((2.0 * m[self.rows, self.cols], self.rows, self.indptr), shape=(k, k))

    def a_matrix(self, a: np.ndarray) -> sp.csc_matrix:
        """``A = [a^T; I]`` in CSC form (column j: ``a_j`` in row 0, 1 in row j + 1)."""
        k = self.k
        data = np.stack([np.asarray(a, dtype=np.float64), np.ones(k)], axis=1).ravel()
        return sp.csc_matrix((data, self.a_rows, np.arange(0, 2 * k + 1, 2)), shape=(k + 1, k))


class MinNormSolver:
    """OSQP min-norm QP ``min lambda^T M lambda`` on the simplex, warm-started from the last solution.

    A zero (or numerically zero, :data:`ZERO_GRADIENT_RTOL`) gradient is answered exactly
    without OSQP: its vertex, ``d = 0``, status ``"zero_gradient"`` (:func:`zero_gradient_vertex`).
    Otherwise OSQP solves the unit-diagonal form (:func:`unit_diagonal_scaling`): ``P = 2 C`` with
    ``C = M / (n n^T)`` (dense upper triangle), ``q = 0``, constraints ``a^T mu = 1`` and ``mu >=
    0``, ``lambda = a * mu``. This scaling makes the problem independent of the gradients' sizes:
    raw LoRA Grams (norms ~1e-5) and norms spread over 12 decades alike (dividing by the mean
    diagonal only, as before, failed or stopped at wrong points on a quarter to nearly all of
    such Grams). When OSQP does not report ``solved``, the documented fallback is
    :func:`frank_wolfe_min_norm` started from OSQP's iterate (``fallback=True``, status kept for
    the metric).

    Deterministic for exact resume: every call sets up a fresh OSQP workspace (builtin algebra,
    rho adapted on a fixed iteration interval, never on timing) warm-started from ``x =
    last_weights`` only, so the result is a function of the Gram and ``last_weights`` (which
    checkpoints save as ``qp_warm_start``). A workspace kept across calls would carry its dual
    iterate, adapted rho and re-scaled data into the next solve, state a checkpoint does not hold.
    """

    def __init__(self, eps_abs: float = 1e-9, eps_rel: float = 1e-9, max_iter: int = 10_000):
        self.settings: dict[str, Any] = {
            "eps_abs": eps_abs,
            "eps_rel": eps_rel,
            "max_iter": max_iter,
            "polishing": True,
            "verbose": False,
            "warm_starting": True,
            "adaptive_rho": ADAPTIVE_RHO_ITERATIONS,
            "adaptive_rho_interval": 50,
        }
        self._structure: _QPStructure | None = None
        self.last_weights: np.ndarray | None = None

    def _structure_for(self, k: int) -> _QPStructure:
        """The cached K-only part of the problem (rebuilt when K changes)."""
        if self._structure is None or self._structure.k != k:
            self._structure = _QPStructure.for_k(k)
        return self._structure

    def _solve_osqp(
        self, c: np.ndarray, a: np.ndarray, init: np.ndarray | None
    ) -> tuple[str, np.ndarray]:
        """One solve of ``min mu^T C mu, a^T mu = 1, mu >= 0`` in a new workspace, warm-started
        from ``mu = init / a`` (primal only, ``init`` being weights ``lambda``); status and mu."""
        k = c.shape[0]
        qp = self._structure_for(k)
        solver = osqp.OSQP(algebra="builtin")  # never an installed MKL/CUDA backend's numerics
        solver.setup(
            P=qp.p_upper(c),
            q=np.zeros(k),
            A=qp.a_matrix(a),
            l=qp.lower,
            u=qp.upper,
            **self.settings,
        )
        if init is not None and len(init) == k:
            solver.warm_start(x=np.asarray(init, dtype=np.float64) / a)
        result = solver.solve(raise_error=False)
        return str(result.info.status), np.asarray(result.x, dtype=np.float64)

    def __call__(
        self, gram: np.ndarray | Tensor, warm_start: np.ndarray | None = None
    ) -> BalanceResult:
        m = _check_gram(gram)
        k = m.shape[0]
        start = time.perf_counter()
        if k == 1:
            return BalanceResult(np.ones(1), "single", time.perf_counter() - start, False)
        scale = float(np.trace(m)) / k
        if scale <= 0.0:
            weights = np.full(k, 1.0 / k)
            return BalanceResult(weights, "zero_gram", time.perf_counter() - start, True)
        vertex = zero_gradient_vertex(m)
        if vertex is not None:
            weights = np.zeros(k)
            weights[vertex] = 1.0
            self.last_weights = weights
            return BalanceResult(weights, "zero_gradient", time.perf_counter() - start, False)
        c, a = unit_diagonal_scaling(m)
        init = warm_start if warm_start is not None else self.last_weights
        try:
            status, x = self._solve_osqp(c, a, init)
        except Exception as err:  # a failing OSQP must not stop training
            status, x = f"error: {type(err).__name__}: {err}", np.full(k, np.nan)
        weights = _simplex_from_scaled(x, a)
        ok = status == "solved" and weights is not None
        if not ok:
            weights = frank_wolfe_min_norm(m / scale, init=weights)
        self.last_weights = weights
        return BalanceResult(weights, status, time.perf_counter() - start, not ok)

    def reset(self) -> None:
        """Forget the warm start (the only state that carries from one solve to the next)."""
        self.last_weights = None


def min_norm_coefficients(
    gram: np.ndarray | Tensor,
    warm_start: np.ndarray | None = None,
    solver: MinNormSolver | None = None,
) -> BalanceResult:
    """MARBLE's coefficients: the min-norm point of the gradients' convex hull (OSQP).

    Pass the same ``solver`` across steps to warm-start each solve from the previous solution.
    """
    return (solver or MinNormSolver())(gram, warm_start=warm_start)


#: OSQP settings of :func:`project_to_safe_set`: as :class:`MinNormSolver`'s, deterministic.
PROJECTION_SETTINGS: dict[str, Any] = {
    "eps_abs": 1e-9,
    "eps_rel": 1e-9,
    "max_iter": 10_000,
    "polishing": True,
    "verbose": False,
    "adaptive_rho": ADAPTIVE_RHO_ITERATIONS,
    "adaptive_rho_interval": 50,
}


def step_towards_safe(
    m: np.ndarray, weights: np.ndarray, safe: np.ndarray
) -> tuple[np.ndarray, float]:
    """Shortest move ``(1 - t) w + t lambda_safe`` along the segment making ``M w >= 0``; (w, t).

    ``(M w(t))_k`` is affine in ``t``, so each violated row ``v_k = (M w)_k < 0`` needs ``t >=
    -v_k / (s_k - v_k)`` with ``s = M lambda_safe``; a row that ``lambda_safe`` does not improve
    needs ``t = 1``. Both ends on the simplex keep the result there.
    """
    v, target = m @ weights, m @ safe
    bad = v < 0.0
    if not np.any(bad):
        return weights, 0.0
    rise = target[bad] - v[bad]
    needed = np.where(rise > 0.0, -v[bad] / np.where(rise > 0.0, rise, 1.0), 1.0)
    t = float(min(1.0, np.max(needed)))
    return (1.0 - t) * weights + t * safe, t


def project_to_safe_set(
    lambda_bar: np.ndarray,
    gram: np.ndarray | Tensor,
    fallback: np.ndarray | None = None,
    rtol: float = 1e-9,
) -> np.ndarray:
    """Euclidean projection of ``lambda_bar`` onto ``{lambda in simplex : M lambda >= 0}``.

    The safe set holds the weights whose direction pushes no reward backwards; it is never empty,
    as the min-norm point ``lambda*`` (``fallback``; solved here when None) has ``M lambda* >=
    ||d||^2 >= 0``. ``lambda_bar`` itself is returned (a copy) when it does not conflict
    (:func:`conflicts` with ``rtol``). Otherwise OSQP solves ``min 1/2 ||lambda||^2 -
    lambda_bar^T lambda`` with ``sum lambda = 1``, ``lambda >= 0`` and ``(M / mean diag)
    lambda >= 0`` (rows of zero gradients, identically 0, dropped), in a fresh workspace with
    :data:`PROJECTION_SETTINGS` (deterministic: same inputs, same bits). The solution is clipped
    and renormalised, and if it still conflicts beyond ``rtol`` (OSQP's tolerance) it takes the
    shortest step towards ``lambda*`` that removes the conflict (:func:`step_towards_safe`).
    When OSQP does not report ``solved``, or the result still conflicts, ``lambda*`` is returned.
    """
    m = _check_gram(gram)
    k = m.shape[0]
    bar = np.asarray(lambda_bar, dtype=np.float64)
    if bar.shape != (k,):
        raise ValueError(f"lambda_bar has shape {bar.shape}, expected ({k},) for a {k}x{k} Gram")
    if not conflicts(m, bar, rtol):
        return bar.copy()
    safe = min_norm_coefficients(m).weights if fallback is None else fallback
    safe = np.asarray(safe, dtype=np.float64)
    if safe.shape != (k,):
        raise ValueError(f"fallback has shape {safe.shape}, expected ({k},) for a {k}x{k} Gram")
    ms = m / (float(np.trace(m)) / k)  # conflicts => some gradient is nonzero => trace > 0
    rows = ms[np.diag(ms) > 0.0]
    a = sp.csc_matrix(np.vstack([np.ones((1, k)), np.eye(k), rows]))
    lower = np.concatenate([[1.0], np.zeros(k + rows.shape[0])])
    upper = np.concatenate([[1.0], np.full(k + rows.shape[0], np.inf)])
    try:
        solver = osqp.OSQP(algebra="builtin")  # never an installed MKL/CUDA backend's numerics
        solver.setup(
            P=sp.identity(k, format="csc"), q=-bar, A=a, l=lower, u=upper, **PROJECTION_SETTINGS
        )
        result = solver.solve(raise_error=False)
        status, x = str(result.info.status), np.asarray(result.x, dtype=np.float64)
    except Exception:  # a failing OSQP must not stop training: lambda* is always safe
        return safe.copy()
    if status != "solved" or not np.all(np.isfinite(x)) or float(np.clip(x, 0.0, None).sum()) <= 0:
        return safe.copy()
    lam = np.clip(x, 0.0, None)
    lam /= lam.sum()
    if conflicts(m, lam, rtol):
        lam, _ = step_towards_safe(ms, lam, safe)
    return safe.copy() if conflicts(m, lam, rtol) else lam


class FixedWeights:
    """Baseline: the same user weights every step (normalised to the simplex)."""

    def __init__(self, weights: list[float] | np.ndarray):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(
                f"weights must be a non-empty list of non-negative numbers with a positive sum, got {weights}"
            )
        self.weights = w / w.sum()

    def __call__(self, gram: np.ndarray | Tensor | None = None) -> BalanceResult:
        if gram is not None and _check_gram(gram).shape[0] != self.weights.size:
            raise ValueError(
                f"{self.weights.size} weights given for {np.shape(gram)[0]} rewards: give one weight per reward"
            )
        return BalanceResult(self.weights.copy(), "fixed", 0.0, False)


class SingleReward(FixedWeights):
    """Baseline: all weight on one reward (the single-reward speed reference)."""

    def __init__(self, num_rewards: int, index: int = 0):
        if not 0 <= index < num_rewards:
            raise ValueError(f"reward index {index} out of range for {num_rewards} rewards")
        w = np.zeros(num_rewards)
        w[index] = 1.0
        super().__init__(w)


def gradient_scales(
    gram: np.ndarray | Tensor, mode: Normalization = "none", losses: np.ndarray | None = None
) -> np.ndarray:
    """Per-reward scales ``s_k`` for the normalisation ``g_k -> g_k / s_k`` before the QP.

    ``none``: 1; ``l2`` and ``unit``: ``||g_k||`` (MGDA's normalised variant; zero gradients
    keep 1); ``loss``: the reward's loss value ``L_k`` (MGDA-UB's loss scaling; needs ``losses``).
    """
    m = _check_gram(gram)
    k = m.shape[0]
    if mode == "none":
        return np.ones(k)
    if mode in ("l2", "unit"):
        norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
        return np.where(norms > 0, norms, 1.0)
    if mode == "loss":
        if losses is None:
            raise ValueError("normalization='loss' needs the per-reward losses")
        s = np.abs(np.asarray(losses, dtype=np.float64))
        return np.where(s > 0, s, 1.0)
    raise ValueError(f"normalization must be one of 'none', 'l2', 'unit', 'loss', got {mode!r}")


def rescale_gram(gram: np.ndarray | Tensor, scales: np.ndarray) -> np.ndarray:
    """Gram of the normalised gradients ``g_k / s_k``: ``M[j, k] / (s_j s_k)``."""
    m = _check_gram(gram)
    return m / np.outer(scales, scales)


def to_raw_weights(weights: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Weights on the raw ``g_k`` giving the same direction as ``weights`` on ``g_k / s_k``.

    Renormalised onto the simplex (a positive rescaling of the direction), because the amortized
    update ``r_bar = r @ lambda`` relies on ``sum lambda = 1`` (the loss is affine in ``r``).
    """
    w = np.asarray(weights, dtype=np.float64) / scales
    return w / w.sum()


def applied_weights(weights: np.ndarray, scales: np.ndarray, mode: Normalization) -> np.ndarray:
    """The coefficients the update applies to the raw per-reward advantages, from the QP's.

    ``unit``: the QP's alpha as it is (the paper authors' ``normalize_grads``: ``sum_k alpha_k
    A_k`` on the raw advantages, whose direction is not the normalised min-norm point); every
    other mode: :func:`to_raw_weights` (the normalised QP's direction on the raw gradients).
    """
    if mode == "unit":
        w = np.asarray(weights, dtype=np.float64)
        return w / w.sum()
    return to_raw_weights(weights, scales)


BalanceOn = Literal["batch", "first_micro_batch"]


@dataclass(frozen=True)
class BalanceCadence:
    """Which micro-batches of a step solve the balance, each group on its own Gram.

    ``batch`` (marble-pl): every ``every_n_steps``-th step one solve on the whole batch's Gram.
    ``first_micro_batch`` (the paper authors' ``amortize_every_n``, ``amortize_warmup``): the
    first ``warmup_steps`` steps solve on every micro-batch separately; later, every
    ``every_n_steps``-th step solves on its first micro-batch only. A solving group applies its
    fresh coefficients; every other micro-batch applies the cached ones.
    """

    every_n_steps: int = 1
    on: BalanceOn = "batch"
    warmup_steps: int = 1

    def __post_init__(self) -> None:
        if self.every_n_steps < 1:
            raise ValueError(
                f"every_n_steps must be >= 1 (1: every step), got {self.every_n_steps}"
            )
        if self.on not in ("batch", "first_micro_batch"):
            raise ValueError(f"on must be 'batch' or 'first_micro_batch', got {self.on!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def groups(self, step: int, micro_batches: int) -> tuple[tuple[int, ...], ...]:
        """The micro-batch indices of each solve of step ``step`` (empty: no solve)."""
        if micro_batches < 1:
            raise ValueError(f"a step has at least one micro-batch, got {micro_batches}")
        if self.on == "first_micro_batch" and step < self.warmup_steps:
            return tuple((i,) for i in range(micro_batches))
        if step % self.every_n_steps != 0:
            return ()
        if self.on == "first_micro_batch":
            return ((0,),)
        return (tuple(range(micro_batches)),)


class EMA:
    """EMA of the balancing coefficients, ``lambda_bar = mu lambda_bar + (1 - mu) lambda*``.

    ``bias_correction=True`` starts from zero and divides by ``1 - mu^t`` (so the first value is
    ``lambda*`` itself); ``False`` starts from uniform weights ``1/K`` (``start="uniform"``) or
    takes the first ``lambda*`` raw (``start="first"``, the paper authors' alpha EMA). Either way
    the result stays on the simplex.
    """

    def __init__(
        self,
        decay: float = 0.9,
        bias_correction: bool = True,
        start: Literal["uniform", "first"] = "uniform",
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay mu must be in [0, 1), got {decay}")
        if start not in ("uniform", "first"):
            raise ValueError(f"EMA start must be 'uniform' or 'first', got {start!r}")
        if start == "first" and bias_correction:
            raise ValueError(
                "EMA start='first' takes the first value raw: it needs bias_correction=False"
            )
        self.decay = float(decay)
        self.bias_correction = bool(bias_correction)
        self.start = start
        self.step = 0
        self._m: np.ndarray | None = None

    @property
    def value(self) -> np.ndarray | None:
        """Current ``lambda_bar`` (None before the first update)."""
        if self._m is None:
            return None
        if self.bias_correction:
            return self._m / (1.0 - self.decay**self.step)
        return self._m.copy()

    def update(self, weights: np.ndarray) -> np.ndarray:
        """Fold in this step's ``lambda*`` and return the smoothed ``lambda_bar``."""
        w = np.asarray(weights, dtype=np.float64)
        if self._m is None or self._m.shape != w.shape:
            if self.start == "first":  # the first value taken raw
                self.step, self._m = 1, w.copy()
                return w.copy()
            self.step = 0
            self._m = np.zeros_like(w) if self.bias_correction else np.full_like(w, 1.0 / w.size)
        self.step += 1
        self._m = self.decay * self._m + (1.0 - self.decay) * w
        value = self.value
        assert value is not None
        return value

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: decay, mode, step and the raw accumulator."""
        return {
            "decay": self.decay,
            "bias_correction": self.bias_correction,
            "step": self.step,
            "m": None if self._m is None else self._m.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.decay = float(state["decay"])
        self.bias_correction = bool(state["bias_correction"])
        self.step = int(state["step"])
        self._m = None if state["m"] is None else np.asarray(state["m"], dtype=np.float64)

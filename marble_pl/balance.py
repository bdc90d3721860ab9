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
    "conflicts",
    "gradient_scales",
    "rescale_gram",
    "to_raw_weights",
    "project_to_simplex",
]

Normalization = Literal["none", "l2", "loss"]


@dataclass(frozen=True)
class BalanceResult:
    """Coefficients and how they were obtained.

    ``status`` is OSQP's status string (``"solved"``, ``"solved inaccurate"``, ...) or one of
    ``"single"`` (K = 1), ``"zero_gram"`` (all gradients zero: uniform weights), ``"fixed"``.
    ``fallback`` is True when the weights did not come from a solved QP.
    """

    weights: np.ndarray
    status: str
    solve_seconds: float
    fallback: bool


class Balancer(Protocol):
    """Maps a ``[K, K]`` Gram matrix to coefficients on the simplex."""

    def __call__(self, gram: np.ndarray) -> BalanceResult: ...


def gram(grads: Tensor) -> Tensor:
    """Gram matrix ``M[j, k] = <g_j, g_k>`` of ``[K, P]`` gradients, in float64 for the QP."""
    if grads.ndim != 2:
        raise ValueError(f"grads must be [K, P], got shape {tuple(grads.shape)}")
    g = grads.double()
    return g @ g.t()


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


#: OSQP's "adapt rho every ``adaptive_rho_interval`` iterations" mode (``OSQP_ADAPTIVE_RHO_UPDATE_
#: ITERATIONS``). Pinned: the alternatives (``2``, time based; ``adaptive_rho_interval=0`` before
#: osqp 1.0) adapt rho after a fraction of the measured setup *time*, which makes the iterates,
#: and so the last bits of the coefficients, depend on the machine's load.
ADAPTIVE_RHO_ITERATIONS = 1


@dataclass(frozen=True)
class _QPStructure:
    """The parts of the QP that depend only on K: the index pattern of P's upper triangle, A, l, u."""

    rows: np.ndarray
    indptr: np.ndarray
    cols: np.ndarray
    a: sp.csc_matrix
    lower: np.ndarray
    upper: np.ndarray

    @classmethod
    def for_k(cls, k: int) -> _QPStructure:
        """Constraints ``sum lambda = 1`` (row 0) and ``lambda >= 0`` (rows 1..K); dense triu(P)."""
        return cls(
            rows=np.concatenate([np.arange(j + 1) for j in range(k)]),
            indptr=np.concatenate([[0], np.cumsum(np.arange(1, k + 1))]),
            cols=np.concatenate([np.full(j + 1, j) for j in range(k)]),
            a=sp.csc_matrix(np.vstack([np.ones((1, k)), np.eye(k)])),
            lower=np.concatenate([[1.0], np.zeros(k)]),
            upper=np.concatenate([[1.0], np.full(k, np.inf)]),
        )

    def p_upper(self, m: np.ndarray) -> sp.csc_matrix:
        """``P = 2 M`` as its dense upper triangle in CSC form."""
        k = m.shape[0]
        return sp.csc_matrix((2.0 * m[self.rows, self.cols], self.rows, self.indptr), shape=(k, k))


class MinNormSolver:
    """OSQP min-norm QP ``min lambda^T M lambda`` on the simplex, warm-started from the last solution.

    ``P = 2 M`` (dense upper triangle), ``q = 0``, constraints ``sum lambda = 1`` and
    ``lambda >= 0``. The Gram is divided by its mean diagonal first: raw LoRA Grams (norms ~1e-5)
    otherwise stop OSQP at a feasible but wrong point. When OSQP does not report ``solved``, the
    documented fallback is :func:`frank_wolfe_min_norm` started from OSQP's projected iterate
    (``fallback=True``, status kept for the metric).

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
        if self._structure is None or self._structure.a.shape[1] != k:
            self._structure = _QPStructure.for_k(k)
        return self._structure

    def _solve_osqp(self, m: np.ndarray, init: np.ndarray | None) -> tuple[str, np.ndarray]:
        """One solve in a new workspace, warm-started from ``init`` (primal only); status and x."""
        k = m.shape[0]
        qp = self._structure_for(k)
        solver = osqp.OSQP(algebra="builtin")  # never an installed MKL/CUDA backend's numerics
        solver.setup(
            P=qp.p_upper(m), q=np.zeros(k), A=qp.a, l=qp.lower, u=qp.upper, **self.settings
        )
        if init is not None and len(init) == k:
            solver.warm_start(x=np.asarray(init, dtype=np.float64))
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
        m = m / scale
        init = warm_start if warm_start is not None else self.last_weights
        try:
            status, x = self._solve_osqp(m, init)
        except Exception as err:  # a failing OSQP must not stop training
            status, x = f"error: {type(err).__name__}: {err}", np.full(k, np.nan)
        ok = status == "solved" and bool(np.all(np.isfinite(x)))
        if ok:
            weights = project_to_simplex(x)
        else:
            init_fw = project_to_simplex(x) if np.all(np.isfinite(x)) else None
            weights = frank_wolfe_min_norm(m, init=init_fw)
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

    ``none``: 1; ``l2``: ``||g_k||`` (MGDA's normalised variant; zero gradients keep 1);
    ``loss``: the reward's loss value ``L_k`` (MGDA-UB's loss scaling; needs ``losses``).
    """
    m = _check_gram(gram)
    k = m.shape[0]
    if mode == "none":
        return np.ones(k)
    if mode == "l2":
        norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
        return np.where(norms > 0, norms, 1.0)
    if mode == "loss":
        if losses is None:
            raise ValueError("normalization='loss' needs the per-reward losses")
        s = np.abs(np.asarray(losses, dtype=np.float64))
        return np.where(s > 0, s, 1.0)
    raise ValueError(f"normalization must be one of 'none', 'l2', 'loss', got {mode!r}")


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


class EMA:
    """EMA of the balancing coefficients, ``lambda_bar = mu lambda_bar + (1 - mu) lambda*``.

    ``bias_correction=True`` starts from zero and divides by ``1 - mu^t`` (so the first value is
    ``lambda*`` itself); ``False`` starts from uniform weights ``1/K``. Either way the result stays
    on the simplex.
    """

    def __init__(self, decay: float = 0.9, bias_correction: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay mu must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.bias_correction = bool(bias_correction)
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

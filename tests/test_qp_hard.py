"""MinNormSolver on hard Grams: zero-gradient rows and gradient norms over 12 decades.

Dividing the Gram by its mean diagonal left OSQP failing ("solved inaccurate", "maximum
iterations reached") or stopping at wrong points on such Grams, and the Frank-Wolfe fallback was
slow and inaccurate there. These tests pin the fix: zero rows are answered exactly, the rest is
solved by OSQP in unit-diagonal variables, optimal against an exact reference, deterministically.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from marble_pl.balance import (
    ZERO_GRADIENT_RTOL,
    MinNormSolver,
    conflicts,
    unit_diagonal_scaling,
    zero_gradient_vertex,
)

#: Relative objective gap allowed against the exact reference (floored, see _gap).
GAP_TOL = 1e-6
#: The gap's floor on ``s`` (the benchmark's): float64 round-off of ``f``, ``~K eps s``, is below
#: 1e-6 of it.
GAP_FLOOR = 1e-8
#: Largest KKT violation allowed in cosine units: ``f - (M lambda)_k <= KKT_TOL n_k sqrt(s)``.
KKT_TOL = 1e-7


def hard_gram(k: int, rng: np.random.Generator, zero_rows: int = 0, dim: int = 256) -> np.ndarray:
    """Gradients with norms spanning 12 decades (ends pinned), conflicting directions, and
    ``zero_rows`` exactly zero rows; their Gram."""
    shared = rng.standard_normal(dim)
    g = rng.normal(0.5, 1.0, size=(k, 1)) * shared + rng.standard_normal((k, dim))
    exponents = rng.uniform(-12.0, 0.0, size=k)
    order = rng.permutation(k)
    exponents[order[0]], exponents[order[1]] = 0.0, -12.0
    g = g / np.linalg.norm(g, axis=1, keepdims=True) * (1e-5 * 10.0**exponents)[:, None]
    g[rng.choice(k, size=zero_rows, replace=False)] = 0.0
    return g @ g.T


def exact_min_norm(m: np.ndarray) -> np.ndarray:
    """Exact reference by enumerating supports (small K): on each support ``S`` the minimiser of
    the affine hull solves a bordered system, here in unit-diagonal variables so that 24 decades
    of ``M_kk`` stay exact; the best one with nonnegative weights is the answer."""
    k = m.shape[0]
    n = np.sqrt(np.diag(m))
    best, best_f = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = np.array(support)
            a = n[idx].min() / n[idx]
            system = np.zeros((size + 1, size + 1))
            system[:size, :size] = m[np.ix_(idx, idx)] / np.outer(n[idx], n[idx])
            system[:size, size] = system[size, :size] = a
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            mu = np.linalg.lstsq(system, rhs, rcond=None)[0][:size]
            lam = np.zeros(k)
            lam[idx] = a * mu
            if np.any(lam < 0) or lam.sum() <= 0:
                continue
            lam /= lam.sum()
            f = float(lam @ m @ lam)
            if f < best_f:
                best, best_f = lam, f
    assert best is not None
    return best


def _scale(m: np.ndarray, lam: np.ndarray) -> float:
    """``s = (sum_k lambda_k ||g_k||)^2``: the size of the terms whose cancellation gives ``f``."""
    return float(lam @ np.sqrt(np.clip(np.diag(m), 0.0, None))) ** 2


def _gap(m: np.ndarray, lam: np.ndarray, ref: np.ndarray) -> float:
    """Relative objective gap ``(f - f_ref) / max(f_ref, GAP_FLOOR * s_ref)``."""
    f, f_ref = float(lam @ m @ lam), float(ref @ m @ ref)
    return (f - f_ref) / max(f_ref, GAP_FLOOR * _scale(m, ref), 1e-300)


def _kkt(m: np.ndarray, lam: np.ndarray) -> float:
    """Largest KKT violation ``(f - (M lambda)_k) / (n_k sqrt(s))`` over nonzero gradients.

    At the optimum ``<g_k, d> >= ||d||^2`` for every k; in cosine units the check is free of the
    gradients' scale (and of the round-off of ``(M lambda)_k``, about ``eps n_k sqrt(s)``).
    """
    n = np.sqrt(np.clip(np.diag(m), 0.0, None))
    f = float(lam @ m @ lam)
    live = n > 0
    return float(np.max((f - (m @ lam)[live]) / (n[live] * np.sqrt(_scale(m, lam)))))


@pytest.mark.parametrize("k", [2, 5, 8, 16])
def test_hard_grams_are_solved_by_osqp_and_optimal(k: int) -> None:
    """Norms over 12 decades, no zero rows: OSQP solves every one, optimal and non-conflicting."""
    rng = np.random.default_rng(1000 + k)
    for i in range(40):
        m = hard_gram(k, rng)
        res = MinNormSolver()(m)
        lam = res.weights
        assert res.status == "solved" and not res.fallback, (i, res.status)
        assert np.all(lam >= 0) and abs(lam.sum() - 1.0) < 1e-12
        assert _kkt(m, lam) < KKT_TOL, i
        assert not conflicts(m, lam)
        if k <= 8:
            assert _gap(m, lam, exact_min_norm(m)) < GAP_TOL, i


@pytest.mark.parametrize("k", [2, 5, 8, 16])
def test_zero_gradient_rows_are_answered_exactly(k: int) -> None:
    """A zero gradient: its vertex (``d = 0``), status ``zero_gradient``, no fallback."""
    rng = np.random.default_rng(2000 + k)
    for _ in range(20):
        zeros = int(rng.integers(1, max(1, k // 4) + 1))
        m = hard_gram(k, rng, zero_rows=zeros)
        res = MinNormSolver()(m)
        assert res.status == "zero_gradient" and not res.fallback
        vertex = int(np.argmax(res.weights))
        assert m[vertex, vertex] == 0.0
        np.testing.assert_array_equal(res.weights, np.eye(k)[vertex])
        assert float(res.weights @ m @ res.weights) == 0.0


def test_zero_gradient_vertex_threshold() -> None:
    """Numerically zero (norm ratio 1e-16) counts; 1e-12 of the largest norm is solved for."""
    g = np.array([[1.0, 0.0], [-1.0, 0.1], [0.0, 0.0]])
    assert zero_gradient_vertex(g @ g.T) == 2
    g[2] = [1e-16, -1e-16]
    assert zero_gradient_vertex(g @ g.T) == 2
    res = MinNormSolver()(g @ g.T)
    assert res.status == "zero_gradient" and not conflicts(g @ g.T, res.weights)
    g[2] = [1e-12, -1e-12]
    assert zero_gradient_vertex(g @ g.T) is None
    m = g @ g.T
    res = MinNormSolver()(m)
    assert res.status == "solved" and not res.fallback
    assert _gap(m, res.weights, exact_min_norm(m)) < GAP_TOL
    # Several zero rows: the smallest M_kk, then the lowest index.
    m = np.diag([1.0, 0.0, 1e-31, 0.0])
    assert zero_gradient_vertex(m) == 1
    assert zero_gradient_vertex(np.diag([1.0, 2.0])) is None
    assert zero_gradient_vertex(np.zeros((3, 3))) is None  # "zero_gram", handled by the caller
    assert ZERO_GRADIENT_RTOL == 1e-30


def test_unit_diagonal_scaling_is_the_same_problem() -> None:
    """``lambda = a * mu`` maps the scaled objective and constraint back exactly."""
    rng = np.random.default_rng(5)
    m = hard_gram(5, rng)
    c, a = unit_diagonal_scaling(m)
    np.testing.assert_allclose(np.diag(c), 1.0, rtol=1e-14)
    assert a.max() == 1.0 and np.all(a > 0)
    mu = rng.random(5)
    lam = a * mu
    n_min = np.sqrt(np.diag(m)).min()
    np.testing.assert_allclose(lam @ m @ lam, n_min**2 * (mu @ c @ mu), rtol=1e-10)


@pytest.mark.parametrize("k", [2, 5, 8, 16])
def test_hard_grams_are_deterministic(k: int) -> None:
    """Same Gram and warm start -> bit-identical weights, with or without zero rows; a resumed
    solver (fresh object, saved warm start) matches a long-lived one bit for bit."""
    rng = np.random.default_rng(3000 + k)
    grams = [hard_gram(k, rng, zero_rows=int(i % 4 == 3)) for i in range(12)]
    long_lived = MinNormSolver()
    expected = [long_lived(m).weights for m in grams]
    previous = None
    for step, m in enumerate(grams):
        fresh = MinNormSolver()
        if previous is not None:
            fresh.last_weights = np.asarray(previous.tolist(), dtype=np.float64)
        previous = fresh(m).weights
        assert np.array_equal(previous, expected[step]), step
        again = MinNormSolver()(m, warm_start=expected[step - 1] if step else None).weights
        assert np.array_equal(again, expected[step]), step

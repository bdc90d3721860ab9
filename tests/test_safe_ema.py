"""The safe-set projection and the CoefficientEMA guard modes ("reset", "project", "off").

``project_to_safe_set`` is the Euclidean projection of ``lambda_bar`` onto ``{lambda in simplex :
M lambda >= 0}``: the weights nearest the smoothed ones that push no reward backwards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from marble_pl.callbacks.coefficient_ema import DEFAULT_GUARD, CoefficientEMA, guard_mode
from scipy.optimize import minimize

from marble_pl import balance
from marble_pl.balance import MinNormSolver, conflicts, project_to_safe_set, step_towards_safe

#: Distance to the scipy reference projection allowed (both solve to ~1e-9).
DIST_TOL = 1e-6


def conflicting_case(
    k: int, rng: np.random.Generator, decades: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """A Gram of conflicting gradients (norms over ``decades``) and a random simplex point that
    conflicts on it."""
    while True:
        g = rng.normal(0.3, 1.0, size=(1, 16)) + rng.normal(size=(k, 16))
        g *= 10.0 ** rng.uniform(-decades, 0, size=(k, 1))
        m = g @ g.T
        lam_bar = rng.dirichlet(np.full(k, 0.5))
        if conflicts(m, lam_bar):
            return m, lam_bar


def scipy_projection(m: np.ndarray, lam_bar: np.ndarray) -> np.ndarray:
    """Independent reference: SLSQP on the same projection (Gram divided by its mean diagonal)."""
    k = m.shape[0]
    ms = m / (np.trace(m) / k)
    start = MinNormSolver()(m).weights  # feasible start
    res = minimize(
        lambda x: float((x - lam_bar) @ (x - lam_bar)),
        start,
        jac=lambda x: 2.0 * (x - lam_bar),
        bounds=[(0.0, 1.0)] * k,
        constraints=[
            {"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones(k)},
            {"type": "ineq", "fun": lambda x: ms @ x, "jac": lambda x: ms},
        ],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    return res.x


def _assert_safe_simplex(m: np.ndarray, lam: np.ndarray) -> None:
    assert np.all(lam >= 0) and abs(lam.sum() - 1.0) < 1e-12
    assert np.min(m @ lam) >= -1e-9 * np.trace(m) / m.shape[0]
    assert not conflicts(m, lam)


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_projection_is_safe_and_the_nearest_safe_point(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(15):
        m, lam_bar = conflicting_case(k, rng)
        lam = project_to_safe_set(lam_bar, m)
        _assert_safe_simplex(m, lam)
        ref = scipy_projection(m, lam_bar)
        ms = m / (np.trace(m) / k)
        assert np.min(ms @ ref) >= -1e-9 and abs(ref.sum() - 1.0) < 1e-9  # a valid reference
        assert np.linalg.norm(lam - lam_bar) <= np.linalg.norm(ref - lam_bar) + DIST_TOL
        np.testing.assert_allclose(lam, ref, atol=1e-5)  # the projection is unique


def test_projection_beats_a_brute_force_grid_k3() -> None:
    """No safe point of a 1/400 simplex grid is nearer than the projection (beyond the grid step)."""
    rng = np.random.default_rng(11)
    m, lam_bar = conflicting_case(3, rng)
    lam = project_to_safe_set(lam_bar, m)
    steps = 400
    grid = np.array(
        [(i, j, steps - i - j) for i in range(steps + 1) for j in range(steps + 1 - i)],
        dtype=np.float64,
    ) / float(steps)
    safe = grid[np.min(grid @ m, axis=1) >= 0.0]
    best = float(np.min(np.linalg.norm(safe - lam_bar, axis=1)))
    assert np.linalg.norm(lam - lam_bar) <= best + 1e-12
    assert best - np.linalg.norm(lam - lam_bar) < 2.0 / steps  # and the grid gets close to it


def test_projection_returns_lambda_bar_when_safe() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 8)) + 3.0  # aligned: every simplex point is safe
    m = g @ g.T
    lam_bar = rng.dirichlet(np.ones(4))
    assert not conflicts(m, lam_bar)
    out = project_to_safe_set(lam_bar, m)
    assert np.array_equal(out, lam_bar) and out is not lam_bar
    # Tensors are accepted as Grams, like everywhere in balance.py.
    assert np.array_equal(project_to_safe_set(lam_bar, torch.from_numpy(m)), lam_bar)


def test_projection_is_deterministic_and_on_the_boundary() -> None:
    rng = np.random.default_rng(3)
    m, lam_bar = conflicting_case(5, rng)
    runs = [project_to_safe_set(lam_bar, m) for _ in range(5)]
    assert all(np.array_equal(r, runs[0]) for r in runs)
    # The nearest safe point of an unsafe lambda_bar lies on the boundary M lambda = 0.
    assert np.min(m @ runs[0]) <= 1e-6 * np.trace(m) / 5


@pytest.mark.parametrize("k", [2, 4, 8])
def test_projection_on_badly_scaled_grams_is_safe_and_no_farther_than_lambda_star(k: int) -> None:
    """Norms over 6 decades make the safe set a sliver (OSQP may call it infeasible): whatever
    comes back is safe, on the simplex, and no farther from lambda_bar than lambda* is."""
    rng = np.random.default_rng(100 + k)
    for _ in range(20):
        m, lam_bar = conflicting_case(k, rng, decades=6.0)
        star = MinNormSolver()(m).weights
        lam = project_to_safe_set(lam_bar, m, fallback=star)
        _assert_safe_simplex(m, lam)
        assert np.linalg.norm(lam - lam_bar) <= np.linalg.norm(star - lam_bar) + 1e-9


def test_projection_handles_zero_and_tiny_gradients() -> None:
    """Zero rows (their constraint is 0 >= 0) and norms over 12 decades."""
    rng = np.random.default_rng(4)
    g = rng.normal(0.2, 1.0, size=(5, 16)) * (10.0 ** np.array([0, -3, -6, -12, 0]))[:, None]
    g[4] = 0.0  # a reward without gradient
    g[0] = -1e3 * g[1] + 1e-3 * g[0]  # a large gradient against reward 1
    m = g @ g.T
    lam_bar = np.array([0.1, 0.6, 0.2, 0.05, 0.05])
    assert conflicts(m, lam_bar)
    lam = project_to_safe_set(lam_bar, m)
    _assert_safe_simplex(m, lam)
    np.testing.assert_allclose(lam, scipy_projection(m, lam_bar), atol=1e-6)
    # lambda* is the zero gradient's vertex (d = 0): the projection keeps far more of lambda_bar.
    star = MinNormSolver()(m).weights
    assert np.linalg.norm(lam - lam_bar) < 0.2 * np.linalg.norm(star - lam_bar)


def test_loose_osqp_answers_are_made_safe_by_the_final_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OSQP at tolerance 1e-3 without polishing returns points that still conflict: the final
    step towards lambda* removes the conflict, and stays near the exact projection."""
    monkeypatch.setitem(balance.PROJECTION_SETTINGS, "eps_abs", 1e-3)
    monkeypatch.setitem(balance.PROJECTION_SETTINGS, "eps_rel", 1e-3)
    monkeypatch.setitem(balance.PROJECTION_SETTINGS, "polishing", False)
    steps: list[float] = []

    def spy(m: np.ndarray, w: np.ndarray, safe: np.ndarray) -> tuple[np.ndarray, float]:
        out = step_towards_safe(m, w, safe)
        steps.append(out[1])
        return out

    monkeypatch.setattr(balance, "step_towards_safe", spy)
    rng = np.random.default_rng(6)
    for _ in range(30):
        m, lam_bar = conflicting_case(4, rng)
        lam = project_to_safe_set(lam_bar, m)
        _assert_safe_simplex(m, lam)
        assert np.linalg.norm(lam - scipy_projection(m, lam_bar)) < 0.05
    assert len(steps) >= 3 and all(0.0 < t < 0.5 for t in steps)


def test_projection_falls_back_to_lambda_star(monkeypatch: pytest.MonkeyPatch) -> None:
    """OSQP not solving -> the given lambda* (always safe) is returned."""
    rng = np.random.default_rng(5)
    m, lam_bar = conflicting_case(4, rng)
    star = MinNormSolver()(m).weights
    monkeypatch.setitem(balance.PROJECTION_SETTINGS, "max_iter", 1)
    out = project_to_safe_set(lam_bar, m, fallback=star)
    assert np.array_equal(out, star) and out is not star


def test_step_towards_safe_is_the_shortest_fixing_step() -> None:
    m = np.array([[1.0, -0.9], [-0.9, 1.0]])
    star = np.array([0.5, 0.5])  # M star = [0.05, 0.05] >= 0
    w = np.array([0.9, 0.1])  # M w = [0.81, -0.71]
    fixed, t = step_towards_safe(m, w, star)
    assert 0 < t < 1 and abs(float((m @ fixed)[1])) < 1e-15
    np.testing.assert_allclose(fixed, (1 - t) * w + t * star)
    same, t0 = step_towards_safe(m, star, w)
    assert t0 == 0.0 and same is star


def _ema_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The callback test's setup: lambda_bar drifts from reward 0 and conflicts with reward 1."""
    g = np.array([[1.0, 0.0], [-0.9, 0.3]])
    m = g @ g.T
    raw = MinNormSolver()(m).weights
    return m, raw, np.array([1.0, 0.0])


def test_guard_modes_apply_what_they_document() -> None:
    m, raw, first = _ema_case()
    applied = {}
    emas = {}
    for mode in ("reset", "project", "off"):
        ema = CoefficientEMA(decay=0.9, guard=mode)
        ema.update(first)
        applied[mode] = ema.update(raw, m)
        emas[mode] = ema
    lam_bar = emas["off"].value
    assert conflicts(m, lam_bar)
    # The running average folds in lambda* in every mode.
    for ema in emas.values():
        assert np.array_equal(ema.value, lam_bar)
    np.testing.assert_array_equal(applied["off"], lam_bar)
    np.testing.assert_array_equal(applied["reset"], raw)
    np.testing.assert_array_equal(applied["project"], project_to_safe_set(lam_bar, m, raw))
    assert not conflicts(m, applied["project"])
    # The projection stays nearer to lambda_bar than lambda* does (smoothing kept where safe).
    assert np.linalg.norm(applied["project"] - lam_bar) < np.linalg.norm(raw - lam_bar) - 1e-3
    assert (emas["reset"].guarded, emas["project"].guarded, emas["off"].guarded) == (1, 1, 0)
    # No Gram, or a safe lambda_bar: lambda_bar in every mode, nothing counted.
    for ema in emas.values():
        before = ema.guarded
        np.testing.assert_array_equal(ema.update(raw), ema.value)
        assert ema.guarded == before


def test_guard_booleans_default_and_bad_values() -> None:
    assert DEFAULT_GUARD == "project"  # the toy study's pick (docs/toy_study.md)
    assert CoefficientEMA().guard == DEFAULT_GUARD
    assert CoefficientEMA(guard=True).guard == "reset"
    assert CoefficientEMA(guard=False).guard == "off"
    assert CoefficientEMA(guard=np.bool_(True)).guard == "reset"
    assert guard_mode("project") == "project"
    with pytest.raises(ValueError, match="guard must be one of"):
        CoefficientEMA(guard="clip")  # type: ignore[arg-type]
    # Booleans behave as before: True applies lambda*, False lambda_bar.
    m, raw, first = _ema_case()
    on, off = CoefficientEMA(decay=0.9, guard=True), CoefficientEMA(decay=0.9, guard=False)
    for ema in (on, off):
        ema.update(first)
    np.testing.assert_array_equal(on.update(raw, m), raw)
    np.testing.assert_array_equal(off.update(raw, m), off.value)


def test_checkpoint_round_trip_keeps_state_and_configured_guard() -> None:
    m, raw, first = _ema_case()
    ema = CoefficientEMA(decay=0.9, guard="project")
    ema.update(first)
    ema.update(raw, m)
    state = ema.state_dict()
    assert set(state) == {"decay", "bias_correction", "step", "m", "guarded"} | {
        "guarded_between",  # the guard between balanced steps: tests/test_guard_margin.py
        "infeasible",
        "stale",
    }
    resumed = CoefficientEMA(decay=0.9, guard="project")
    resumed.load_state_dict(state)
    assert resumed.guarded == ema.guarded == 1 and resumed.guard == "project"
    np.testing.assert_array_equal(resumed.value, ema.value)
    # Both continue identically, bit for bit.
    np.testing.assert_array_equal(resumed.update(raw, m), ema.update(raw, m))
    assert resumed.guarded == ema.guarded
    # The configured guard wins over the one the checkpoint was written with.
    other = CoefficientEMA(decay=0.9, guard="off")
    other.load_state_dict(state)
    assert other.guard == "off" and other.guarded == 1

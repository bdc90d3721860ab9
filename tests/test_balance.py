import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from marble_pl.balance import (
    EMA,
    FixedWeights,
    MinNormSolver,
    SingleReward,
    frank_wolfe_min_norm,
    gradient_scales,
    gram,
    min_norm_coefficients,
    project_to_simplex,
    rescale_gram,
    to_raw_weights,
)


def _kkt_residual(m: np.ndarray, lam: np.ndarray) -> float:
    """Largest violation of the min-norm KKT conditions (scaled by the Gram's size)."""
    scale = max(np.trace(m) / m.shape[0], 1e-300)
    grad = m @ lam / scale
    nu = lam @ m @ lam / scale
    # grad_k >= nu for every k (no descent direction left) and grad_k == nu on the support.
    return float(max(np.max(nu - grad), np.max(np.abs(grad - nu)[lam > 1e-6], initial=0.0)))


def _reference(m: np.ndarray) -> float:
    k = m.shape[0]
    res = minimize(
        lambda x: x @ m @ x,
        np.full(k, 1.0 / k),
        jac=lambda x: 2 * m @ x,
        bounds=[(0, 1)] * k,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return min(
        float(res.x @ m @ res.x), float(frank_wolfe_min_norm(m) @ m @ frank_wolfe_min_norm(m))
    )


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("seed", range(5))
def test_random_psd_gram_kkt_and_optimality(k, seed):
    rng = np.random.default_rng(seed * 100 + k)
    p = int(rng.integers(1, 3 * k + 2))  # includes rank-deficient cases (p < k)
    scale = 10.0 ** rng.uniform(-6, 3)
    g = rng.normal(size=(k, p)) * scale
    m = gram(torch.from_numpy(g)).numpy()
    res = min_norm_coefficients(m)
    lam = res.weights
    assert lam.shape == (k,) and np.all(lam >= 0) and abs(lam.sum() - 1) < 1e-12
    assert np.isfinite(res.solve_seconds) and res.solve_seconds >= 0
    if k == 1:
        assert res.status == "single" and not res.fallback
        return
    assert res.status == "solved" and not res.fallback
    assert _kkt_residual(m, lam) < 1e-4
    obj = lam @ m @ lam
    assert obj <= _reference(m) * (1 + 1e-4) + 1e-12 * np.trace(m)
    # Non-conflict: <g_k, d> >= ||d||^2 for the min-norm direction d.
    d = lam @ g
    tol = 1e-4 * np.trace(m) / k
    assert np.all(g @ d >= d @ d - tol)


def test_brute_force_grid_k3():
    rng = np.random.default_rng(7)
    g = rng.normal(size=(3, 2))
    m = g @ g.T
    lam = min_norm_coefficients(m).weights
    grid = np.linspace(0, 1, 301)
    best = min(
        np.array([a, b, 1 - a - b]) @ m @ np.array([a, b, 1 - a - b])
        for a, b in itertools.product(grid, grid)
        if a + b <= 1
    )
    assert lam @ m @ lam <= best + 1e-9


@pytest.mark.parametrize(
    "name, grads",
    [
        ("identical", np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])),
        ("zero_one", np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 2.0]])),
        ("opposed", np.array([[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]])),
        ("rank1", np.outer([1.0, 2.0, 0.5, 3.0], [1.0, -1.0, 0.5])),
        ("tiny_lora_scale", np.random.default_rng(0).normal(size=(5, 40)) * 1e-6),
    ],
)
def test_degenerate_grams(name, grads):
    m = grads @ grads.T
    res = min_norm_coefficients(m)
    lam = res.weights
    assert np.all(np.isfinite(lam)) and np.all(lam >= 0) and abs(lam.sum() - 1) < 1e-12
    assert res.status in ("solved", "zero_gradient") and not res.fallback
    d = lam @ grads
    tol = 1e-6 * np.trace(m)
    assert np.all(grads @ d >= d @ d - tol)
    assert lam @ m @ lam <= _reference(m) + 1e-6 * np.trace(m)
    if name in ("zero_one", "opposed"):
        assert np.linalg.norm(d) <= 1e-4 * np.sqrt(np.trace(m))


def test_tiny_lora_scale_is_not_uniform():
    """Gradient norms ~1e-5 must still give the right (non-uniform) answer."""
    g = np.array([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]]) * 1e-5
    lam = min_norm_coefficients(g @ g.T).weights
    expected = frank_wolfe_min_norm((g @ g.T) * 1e10, max_iter=100000)
    np.testing.assert_allclose(lam, expected, atol=1e-4)
    assert not np.allclose(lam, 1 / 3, atol=1e-2)


def test_all_zero_gram_gives_uniform_fallback():
    res = min_norm_coefficients(np.zeros((3, 3)))
    assert res.status == "zero_gram" and res.fallback
    np.testing.assert_allclose(res.weights, np.full(3, 1 / 3))


def test_non_finite_gram_is_a_clear_error():
    m = np.eye(2)
    m[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        min_norm_coefficients(m)


def test_solver_reuse_and_warm_start_match_cold():
    rng = np.random.default_rng(3)
    solver = MinNormSolver()
    for _ in range(20):
        g = rng.normal(size=(5, 12))
        m = g @ g.T
        warm = solver(m)
        cold = min_norm_coefficients(m)
        assert warm.status == "solved"
        np.testing.assert_allclose(
            warm.weights @ m @ warm.weights, cold.weights @ m @ cold.weights, rtol=1e-6
        )
    assert solver.last_weights is not None
    # K may change between calls: the solver sets itself up again.
    assert solver(np.eye(3)).weights.shape == (3,)


def _drifting_grams(k: int, steps: int, seed: int) -> list[np.ndarray]:
    """Grams of LoRA-scale gradients that drift a few percent per step, like training steps."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(k, 64)) * 1e-5
    grams = []
    for _ in range(steps):
        grams.append(g @ g.T)
        g = g + 0.03 * rng.normal(size=g.shape) * np.linalg.norm(g, axis=1, keepdims=True) / 8
    return grams


@pytest.mark.parametrize("k", [2, 5, 8])
def test_resumed_solver_is_bit_identical_to_a_long_lived_one(k):
    """Exact resume: only ``last_weights`` (saved as ``qp_warm_start``) carries between solves."""
    grams = _drifting_grams(k, 30, seed=k)
    long_lived = MinNormSolver()
    expected = [long_lived(m).weights for m in grams]
    previous = None
    for step, m in enumerate(grams):
        fresh = MinNormSolver()  # as after loading a checkpoint: a new module, its saved warm start
        if previous is not None:
            fresh.last_weights = np.asarray(previous.tolist(), dtype=np.float64)
        previous = fresh(m).weights
        assert np.array_equal(previous, expected[step]), step  # bit for bit, not approximately


def test_solver_result_ignores_unrelated_earlier_solves():
    """A solve depends on its Gram and warm start, not on what the solver object solved before."""
    grams = _drifting_grams(4, 5, seed=0)
    busy = MinNormSolver()
    for m in _drifting_grams(4, 20, seed=1):
        busy(m)
    busy.last_weights = None
    assert all(np.array_equal(busy(m).weights, MinNormSolver()(m).weights) for m in grams[:1])
    repeated = [MinNormSolver()(grams[0], warm_start=np.full(4, 0.25)).weights for _ in range(5)]
    assert all(np.array_equal(w, repeated[0]) for w in repeated)


def test_osqp_settings_do_not_depend_on_timing():
    """Rho adapts on a fixed iteration interval (``0`` / mode 2 would use the setup time)."""
    settings = MinNormSolver().settings
    assert settings["adaptive_rho"] == 1  # OSQP_ADAPTIVE_RHO_UPDATE_ITERATIONS
    assert settings["adaptive_rho_interval"] > 0


def test_fallback_when_osqp_does_not_solve():
    solver = MinNormSolver(max_iter=1)
    g = np.random.default_rng(1).normal(size=(4, 6))
    m = g @ g.T
    res = solver(m)
    assert res.status != "solved" and res.fallback
    ref = min_norm_coefficients(m).weights
    assert res.weights @ m @ res.weights <= ref @ m @ ref * (1 + 1e-3)


def test_project_to_simplex():
    np.testing.assert_allclose(project_to_simplex(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])
    np.testing.assert_allclose(project_to_simplex(np.array([2.0, 0.0, -1.0])), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(project_to_simplex(np.array([0.5, 0.5, 0.5])), [1 / 3] * 3)


def test_fixed_and_single_baselines():
    res = FixedWeights([1.0, 3.0])(np.eye(2))
    np.testing.assert_allclose(res.weights, [0.25, 0.75])
    assert res.status == "fixed" and not res.fallback
    with pytest.raises(ValueError, match="one weight per reward"):
        FixedWeights([1.0, 3.0])(np.eye(3))
    with pytest.raises(ValueError, match="non-negative"):
        FixedWeights([1.0, -1.0])
    np.testing.assert_allclose(SingleReward(3, 2)().weights, [0, 0, 1])
    with pytest.raises(ValueError, match="out of range"):
        SingleReward(3, 3)


def test_normalisation_round_trip():
    rng = np.random.default_rng(5)
    g = rng.normal(size=(3, 7)) * np.array([[1e-3], [1.0], [1e2]])
    m = g @ g.T
    s = gradient_scales(m, "l2")
    np.testing.assert_allclose(s, np.linalg.norm(g, axis=1))
    mn = rescale_gram(m, s)
    np.testing.assert_allclose(np.diag(mn), 1.0)
    lam_n = min_norm_coefficients(mn).weights
    w = to_raw_weights(lam_n, s)
    d_norm = lam_n @ (g / s[:, None])
    d_raw = w @ g
    assert abs(w.sum() - 1) < 1e-12
    cos = d_norm @ d_raw / np.linalg.norm(d_norm) / np.linalg.norm(d_raw)
    assert cos == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(gradient_scales(m, "none"), 1.0)
    np.testing.assert_allclose(
        gradient_scales(m, "loss", losses=np.array([2.0, 4.0, 0.0])), [2, 4, 1]
    )
    with pytest.raises(ValueError, match="needs the per-reward losses"):
        gradient_scales(m, "loss")


def test_ema_recurrence_bias_corrected():
    ema = EMA(decay=0.8)
    ws = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.5, 0.5])]
    np.testing.assert_allclose(ema.update(ws[0]), ws[0])
    m = 0.2 * ws[0]
    for t, w in enumerate(ws[1:], start=2):
        m = 0.8 * m + 0.2 * w
        np.testing.assert_allclose(ema.update(w), m / (1 - 0.8**t))
    assert abs(ema.value.sum() - 1) < 1e-12


def test_ema_uniform_start():
    ema = EMA(decay=0.5, bias_correction=False)
    np.testing.assert_allclose(ema.update(np.array([1.0, 0.0, 0.0])), [2 / 3, 1 / 6, 1 / 6])


def test_ema_state_round_trip():
    ema = EMA(decay=0.9)
    rng = np.random.default_rng(0)
    for _ in range(3):
        ema.update(project_to_simplex(rng.normal(size=4)))
    clone = EMA()
    clone.load_state_dict(ema.state_dict())
    w = project_to_simplex(rng.normal(size=4))
    np.testing.assert_allclose(clone.update(w), ema.update(w))
    assert clone.step == ema.step == 4


def test_ema_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)

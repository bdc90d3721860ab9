"""The margin guard (every reward's cosine with the update >= margin) and the guard between
balanced steps (``CoefficientEMA.between``: the last balanced Gram, stale)."""

from __future__ import annotations

import numpy as np
import pytest
from marble_pl.callbacks.coefficient_ema import CoefficientEMA

from marble_pl.balance import MinNormSolver, conflicts, project_to_safe_set
from marble_pl.margin import COS_TOL, project_to_margin_set, update_cosines


def _case(k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A Gram of conflicting gradients (norms over a decade) and a random simplex point."""
    g = rng.normal(size=(k, 16))
    g *= 10.0 ** rng.uniform(-1, 0, size=(k, 1))
    return g @ g.T, rng.dirichlet(np.full(k, 0.5))


def _simplex_grid(n: int) -> np.ndarray:
    """Every point of the K = 3 simplex with coordinates in multiples of 1 / n."""
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    pts = np.stack([i[keep], j[keep], n - i[keep] - j[keep]], axis=1)
    return pts / n


def _grid_cosines(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``min_k cos(g_k, G^T w)`` for every grid point ``w`` (rows of ``pts``)."""
    inner = pts @ m
    norm = np.sqrt(np.clip(np.einsum("ij,ij->i", inner, pts), 1e-300, None))
    return (inner / (np.sqrt(np.diag(m)) * norm[:, None])).min(axis=1)


def test_update_cosines_are_the_exact_cosines() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 9))
    g[2] = 0.0  # a zero gradient never binds
    w = rng.dirichlet(np.ones(4))
    d = g.T @ w
    cos = update_cosines(g @ g.T, w)
    for k in (0, 1, 3):
        assert cos[k] == pytest.approx(g[k] @ d / (np.linalg.norm(g[k]) * np.linalg.norm(d)))
    assert cos[2] == np.inf


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("margin", [0.05, 0.2])
def test_margin_projection_meets_the_margin_or_says_infeasible(k: int, margin: float) -> None:
    rng = np.random.default_rng(k)
    seen = set()
    for _ in range(40):
        m, bar = _case(k, rng)
        star = MinNormSolver()(m).weights
        res = project_to_margin_set(bar, m, margin, fallback=star)
        seen.add(res.status)
        assert res.weights.min() >= 0.0 and res.weights.sum() == pytest.approx(1.0, abs=1e-12)
        assert res.min_cos == pytest.approx(update_cosines(m, res.weights).min(), abs=0.0)
        if res.status == "kept":
            np.testing.assert_array_equal(res.weights, bar)
        if res.status in ("kept", "projected"):
            assert res.min_cos >= margin - COS_TOL
        else:  # the fallback, lambda*: all its cosines positive (>= ||d*|| / ||g_k||)
            np.testing.assert_array_equal(res.weights, star)
            assert res.min_cos > 0.0
    assert "projected" in seen


def test_margin_projection_is_nearest_and_infeasible_only_when_no_point_meets_it() -> None:
    """K = 3 against a grid of the simplex (step 1/400): the answer is no farther from
    lambda_bar than any grid point meeting the margin (up to the grid's spacing), and when it
    says infeasible no grid point meets the margin."""
    rng = np.random.default_rng(7)
    pts = _simplex_grid(400)
    h = np.sqrt(2.0) / 400
    statuses = []
    for _ in range(30):
        m, bar = _case(3, rng)
        margin = float(rng.choice([0.05, 0.15, 0.3, 0.6]))
        res = project_to_margin_set(bar, m, margin)
        statuses.append(res.status)
        ok = _grid_cosines(m, pts) >= margin
        if res.status == "infeasible":
            assert not ok.any()
            continue
        if ok.any():
            best = np.linalg.norm(pts[ok] - bar, axis=1).min()
            assert np.linalg.norm(res.weights - bar) <= best + h
    assert {"projected", "infeasible"} <= set(statuses)


def test_margin_zero_is_the_safe_set_projection() -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        m, bar = _case(3, rng)
        star = MinNormSolver()(m).weights
        res = project_to_margin_set(bar, m, 0.0, fallback=star)
        np.testing.assert_array_equal(res.weights, project_to_safe_set(bar, m, fallback=star))


def test_bad_margin_is_refused() -> None:
    with pytest.raises(ValueError, match="margin"):
        project_to_margin_set(np.ones(2) / 2, np.eye(2), 1.0)
    with pytest.raises(ValueError, match="margin"):
        CoefficientEMA(margin=-0.1)


def _two_rewards() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lambda_bar drifts from reward 0 and conflicts with reward 1 (as test_safe_ema)."""
    g = np.array([[1.0, 0.0], [-0.9, 0.3]])
    m = g @ g.T
    return m, MinNormSolver()(m).weights, np.array([1.0, 0.0])


def test_margin_guard_applies_cosines_above_the_margin() -> None:
    m, raw, first = _two_rewards()
    plain, margin = CoefficientEMA(decay=0.9), CoefficientEMA(decay=0.9, margin=0.05)
    for ema in (plain, margin):
        ema.update(first)
    a_plain, a_margin = plain.update(raw, m), margin.update(raw, m)
    assert update_cosines(m, a_plain).min() == pytest.approx(0.0, abs=1e-6)  # held at 0
    assert update_cosines(m, a_margin).min() >= 0.05 - COS_TOL
    assert (margin.guarded, margin.infeasible) == (1, 0)
    # reset with a margin: lambda* whenever lambda_bar misses it
    reset = CoefficientEMA(decay=0.9, guard="reset", margin=0.05)
    reset.update(first)
    np.testing.assert_array_equal(reset.update(raw, m), raw)


def test_margin_guard_flags_an_infeasible_margin() -> None:
    """Two nearly opposite gradients: no update reaches cos 0.5 with both; lambda* applied."""
    g = np.array([[1.0, 0.0], [-0.99, 0.05]])
    m = g @ g.T
    raw = MinNormSolver()(m).weights
    assert update_cosines(m, raw).min() < 0.5
    ema = CoefficientEMA(decay=0.9, margin=0.5)
    ema.update(np.array([1.0, 0.0]))
    np.testing.assert_array_equal(ema.update(raw, m), raw)
    assert (ema.guarded, ema.infeasible) == (1, 1)


def test_between_checks_lambda_bar_on_the_last_balanced_gram() -> None:
    m, raw, first = _two_rewards()
    checked = CoefficientEMA(decay=0.9)
    unchecked = CoefficientEMA(decay=0.9, check_between=False)
    off = CoefficientEMA(decay=0.9, guard="off")
    assert checked.between() is None  # nothing before the first update
    for ema in (checked, unchecked, off):
        ema.update(first)
        ema.update(raw, m)
    bar = checked.value
    assert conflicts(m, bar)
    applied = checked.between()
    assert not conflicts(m, applied)
    np.testing.assert_array_equal(applied, project_to_safe_set(bar, m, fallback=raw))
    assert checked.guarded_between == 1
    np.testing.assert_array_equal(unchecked.between(), bar)
    np.testing.assert_array_equal(off.between(), bar)
    assert unchecked.guarded_between == off.guarded_between == 0
    # The margin guard between steps too.
    margin = CoefficientEMA(decay=0.9, margin=0.05)
    margin.update(first)
    margin.update(raw, m)
    assert update_cosines(m, margin.between()).min() >= 0.05 - COS_TOL


def test_between_with_absent_rewards_and_resume() -> None:
    rng = np.random.default_rng(1)
    g = rng.normal(size=(3, 8))
    g[2] = -g[0] + 0.1 * rng.normal(size=8)
    m = g @ g.T
    raw = MinNormSolver()(m).weights
    ema = CoefficientEMA(decay=0.9)
    ema.update(np.array([0.0, 0.0, 1.0]))
    ema.update(raw, m)
    # Reward 1 absent: lambda_bar renormalised on rewards 0 and 2, checked on their Gram.
    present = np.array([True, False, True])
    out = ema.between(present)
    assert out[1] == 0.0 and out.sum() == pytest.approx(1.0)
    assert not conflicts(m[np.ix_([0, 2], [0, 2])], out[[0, 2]])
    # No reward with weight: zeros (the module skips the update).
    ema2 = CoefficientEMA(decay=0.9, guard="off")
    ema2.update(np.array([1.0, 0.0, 0.0]))
    np.testing.assert_array_equal(ema2.between(np.array([False, True, True])), np.zeros(3))
    # The stale Gram and the counters survive a checkpoint.
    restored = CoefficientEMA(decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.guarded_between == ema.guarded_between
    np.testing.assert_array_equal(restored.between(present), out)
    np.testing.assert_array_equal(restored.between(), ema.between())


def test_module_between_steps_apply_the_emas_checked_coefficients(tiny_sd3_path) -> None:
    """balance_every_n_steps = 2 on the tiny SD3: a step between balanced ones applies what
    ``CoefficientEMA.between`` returns, checked on the previous balanced step's Gram."""
    from test_module import Recorder, fit, make_module

    module = make_module(
        tiny_sd3_path, gradient_space="gramian", balance_every_n_steps=2, advantage_std="group"
    )
    from marble_pl.callbacks import GradientCosineMonitor

    ema, rec = CoefficientEMA(decay=0.9, margin=0.05), Recorder()
    monitor = GradientCosineMonitor(audit_between_steps=True)
    answers, grams = [], []
    between = ema.between

    def spy(present=None):
        grams.append(ema._stale[1].copy())
        answers.append(between(present))
        return answers[-1]

    ema.between = spy
    fit(module, steps=4, callbacks=[ema, rec, monitor])
    assert [r.balance is not None for r in rec.records] == [True, False, True, False]
    assert len(answers) == 2
    for j, i in enumerate((1, 3)):
        np.testing.assert_array_equal(rec.records[i].weights, answers[j])
        stale = rec.records[i - 1].gram.double().numpy()
        np.testing.assert_array_equal(grams[j], stale)  # the last balanced Gram, all active
        assert update_cosines(stale, answers[j]).min() >= 0.05 - COS_TOL
    # The monitor audited both steps between balanced ones with exact cosines.
    assert (monitor.steps, monitor.steps_between) == (2, 2)
    names = [f"cos_between/{n}" for n in module.reward_names]
    cos = [monitor.last[n] for n in names]
    assert monitor.last["cos_between/min"] == min(cos) and all(-1 <= c <= 1 for c in cos)
    frac = monitor.last["cos_between/frac_min_negative"]
    assert frac == monitor.negative_between / 2


def test_toy_study_guard_rows_smoke(tmp_path) -> None:
    """``benchmarks/toy_study.py --guard-study --smoke``: every row of GUARD_ROWS, the between-
    step fraction only where there are steps between balanced ones, no conflict with the guards
    at every step, and the margin row's worst cosine at or above the margin unless flagged."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_study.py"
    spec = importlib.util.spec_from_file_location("_bench_toy_study_guard", path)
    assert spec is not None and spec.loader is not None
    toy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = toy
    spec.loader.exec_module(toy)
    out = tmp_path / "guard"
    summary = toy.main(["--guard-study", "--smoke", "--jobs", "1", "--out", str(out)])["by_k"][3]
    keys = [toy.Variant(b, "parameters", e, n).key for b, e, n in toy.GUARD_ROWS]
    assert list(summary["rows"]) == keys
    for key, agg in summary["rows"].items():
        every = agg["every"]
        assert (agg["frac_neg_between"] is None) == (every == 1), key
        if every == 1 and agg["ema"] in ("none", "project", "margin"):
            assert agg["frac_neg_worst_cos"]["mean"] == 0.0, key
    margin = summary["rows"]["marble/parameters/margin"]
    if margin["infeasible"] == 0:
        assert margin["frac_below_margin"]["mean"] == 0.0
    text = (out / "results_k3.md").read_text()
    assert "### Guard study, K = 3" in text and text.count("\n| marble") == len(keys)

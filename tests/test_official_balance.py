"""The paper authors' balance as options (issue 22, items 1-4): unit-norm QP with alpha on the raw
advantages, the first-micro-batch cadence, the alpha EMA, the equal-alpha ablation, and the
coefficients applied between balanced steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from marble_pl.callbacks import CoefficientEMA
from test_module import Recorder, fit, make_module

from marble_pl.balance import EMA, BalanceCadence, min_norm_coefficients
from marble_pl.balancers import EqualAlpha, MinNormBalancer, resolve_balancer
from marble_pl.cadence import StepBalance
from marble_pl.errors import ConfigError
from marble_pl.objective import PairObjective

# QP tolerance (OSQP eps 1e-9, polished): weights agree with the closed form far below this.
QP_ATOL = 1e-6


def _grads() -> np.ndarray:
    """Three gradients of norms 2, 1, 1.5 (pairwise cosines 0.1, -0.2, 0.3) whose min-norm
    points, raw and unit-norm, are both interior."""
    cos = np.array([[1.0, 0.1, -0.2], [0.1, 1.0, 0.3], [-0.2, 0.3, 1.0]])
    units = np.linalg.cholesky(cos).T  # columns are unit vectors with these cosines
    return (units * np.array([2.0, 1.0, 1.5])).T  # [K, P] rows g_k


def _interior_min_norm(m: np.ndarray) -> np.ndarray:
    """Closed-form min-norm point on the simplex when it is interior: M^-1 1 / (1^T M^-1 1)."""
    x = np.linalg.solve(m, np.ones(m.shape[0]))
    assert np.all(x > 0), "the hand case must be interior"
    return x / x.sum()


def test_unit_normalization_is_the_unit_norm_qp_alpha_applied_as_is():
    g = _grads()
    m = g @ g.T
    norms = np.linalg.norm(g, axis=1)
    unit_gram = m / np.outer(norms, norms)
    alpha = _interior_min_norm(unit_gram)  # the hand computation: unit Gram -> QP -> alpha
    unit = MinNormBalancer(normalization="unit")
    unit.bind(["a", "b", "c"])
    got = unit.balance(m).weights
    np.testing.assert_allclose(got, alpha, atol=QP_ATOL)
    # l2 solves the same QP but applies its direction to the raw gradients: alpha / ||g||.
    l2 = MinNormBalancer(normalization="l2")
    l2.bind(["a", "b", "c"])
    direction = (alpha / norms) / (alpha / norms).sum()
    np.testing.assert_allclose(l2.balance(m).weights, direction, atol=QP_ATOL)
    # none: the QP on the raw Gram.
    none = MinNormBalancer(normalization="none")
    none.bind(["a", "b", "c"])
    np.testing.assert_allclose(none.balance(m).weights, _interior_min_norm(m), atol=QP_ATOL)
    # The three differ by far more than the QP's tolerance on these norms.
    for other in (direction, _interior_min_norm(m)):
        assert np.abs(got - other).max() > 0.05
    # With equal norms the three coincide (alpha is then the raw min-norm point too).
    same = unit_gram * 4.0
    np.testing.assert_allclose(unit.balance(same).weights, l2.balance(same).weights, atol=QP_ATOL)
    np.testing.assert_allclose(
        unit.balance(same).weights, min_norm_coefficients(same).weights, atol=QP_ATOL
    )


def test_unit_normalization_is_a_config_choice():
    balancer = resolve_balancer(
        {"class_path": "MinNormBalancer", "init_args": {"normalization": "unit"}}
    )
    assert balancer.spec()["init_args"]["normalization"] == "unit"
    with pytest.raises(ConfigError, match="'unit'"):
        MinNormBalancer(normalization="units")


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, ((0,), (1,), (2,))), (1, ()), (9, ()), (10, ((0,),)), (11, ()), (20, ((0,),))],
)
def test_first_micro_batch_cadence_solves_as_the_authors(step, expected):
    """amortize_every_n=10, amortize_warmup=1: step 0 solves on every micro-batch, then the first
    micro-batch of every 10th step."""
    cadence = BalanceCadence(every_n_steps=10, on="first_micro_batch", warmup_steps=1)
    assert cadence.groups(step, 3) == expected


def test_batch_cadence_solves_once_on_the_whole_batch():
    cadence = BalanceCadence(every_n_steps=2, on="batch")
    assert [cadence.groups(s, 3) for s in range(4)] == [((0, 1, 2),), (), ((0, 1, 2),), ()]
    with pytest.raises(ValueError, match="first_micro_batch"):
        BalanceCadence(on="first")


def test_official_alpha_ema_step_by_step():
    """decay 0.7, first solve raw, no bias correction, no guard; each solve applies its fresh
    alpha, the EMA (applied between solves) folds it in."""
    ema = CoefficientEMA(
        decay=0.7, bias_correction=False, start="first", guard="off", apply="fresh_on_solve"
    )
    stars = [np.array([0.2, 0.3, 0.5]), np.array([0.6, 0.1, 0.3]), np.array([0.0, 0.0, 1.0])]
    conflicting = np.array([[1.0, -0.99, 0.0], [-0.99, 1.0, 0.0], [0.0, 0.0, 1.0]])
    expected = stars[0]
    for i, star in enumerate(stars):
        applied = ema.update(star, conflicting)  # a Gram with conflicts: no guard steps in
        np.testing.assert_array_equal(applied, star)
        expected = star if i == 0 else 0.7 * expected + 0.3 * star
        np.testing.assert_allclose(ema.value, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(ema.value, [0.224, 0.168, 0.608], atol=1e-15)
    assert ema.guarded == 0
    with pytest.raises(ValueError, match="bias_correction=False"):
        EMA(0.7, bias_correction=True, start="first")
    with pytest.raises(ValueError, match="apply"):
        CoefficientEMA(apply="fresh")


def test_equal_alpha_is_one_over_k_on_per_reward_estimators(tiny_sd3_path):
    balancer = resolve_balancer({"class_path": "marble_pl.balancers.EqualAlpha"})
    assert isinstance(balancer, EqualAlpha) and not balancer.needs_gram
    balancer.bind(["a", "b", "c", "d"])
    np.testing.assert_array_equal(balancer.fixed_weights(), np.full(4, 0.25))
    assert balancer.mix() is None  # per-reward advantages, not the weighted sum of rewards
    module = make_module(tiny_sd3_path, balancer=EqualAlpha(), gradient_space="output")
    rec = Recorder()
    fit(module, steps=1, callbacks=[rec])
    step = rec.records[0]
    assert step.r_train.shape == step.r.shape == (6, 3)  # one estimator per reward
    np.testing.assert_array_equal(step.weights, np.full(3, 1 / 3))
    assert step.balance is None and step.gram is None  # never solved


def test_between_steps_apply_the_last_balanced_lambda_not_the_normalised_warm_start(
    tiny_sd3_path,
):
    """Bug (issue 22): without CoefficientEMA and with normalization l2, the steps between
    balanced ones applied the QP's warm start (normalised space) instead of the last lambda."""
    balancer = MinNormBalancer(normalization="l2")
    module = make_module(
        tiny_sd3_path, balancer=balancer, balance_every_n_steps=2, gradient_space="gramian"
    )
    rec = Recorder()
    fit(module, steps=2, callbacks=[rec])
    balanced, between = rec.records
    assert balanced.balance is not None and between.balance is None
    # The case where the two spaces differ (so the old behaviour fails this test).
    assert np.abs(balancer.warm_start - balanced.weights).max() > 1e-3
    np.testing.assert_array_equal(between.weights, balanced.weights)
    np.testing.assert_array_equal(balancer.last_applied, balanced.weights)
    state = balancer.state_dict()
    fresh = MinNormBalancer(normalization="l2")
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.last_applied, balanced.weights)


def test_first_micro_batch_module_solves_and_applies_fresh_then_cached(tiny_sd3_path, monkeypatch):
    """6 pairs in micro-batches of 3: step 0 solves on both, step 1 on none, step 2 on the first;
    a solving micro-batch applies its fresh alpha, the other the cached EMA."""
    from marble_pl.gradients import affine_combination

    module = make_module(
        tiny_sd3_path,
        balancer=MinNormBalancer(normalization="unit"),
        balance_every_n_steps=2,
        balance_on="first_micro_batch",
        micro_batch_size=3,
        gradient_space="parameters",
        advantage_std="group",
    )
    ema = CoefficientEMA(
        decay=0.7, bias_correction=False, start="first", guard="off", apply="fresh_on_solve"
    )
    solves: list[tuple[int, int]] = []  # (step, Gram size) per solve
    calls: list[dict] = []
    original_balance = module.balancer.balance

    def balance(m, *args, **kwargs):
        result = original_balance(m, *args, **kwargs)
        solves.append((module.global_step, result.weights.copy()))
        return result

    original_update = PairObjective.accumulate_update

    def accumulate_update(self, pairs, cond, r_bar, kept, stats_of=None, weights=None, mixes=None):
        calls.append({"r_bar": r_bar.clone(), "mixes": mixes, "ema": ema.value})
        return original_update(self, pairs, cond, r_bar, kept, stats_of, weights, mixes)

    monkeypatch.setattr(module.balancer, "balance", balance)
    monkeypatch.setattr(PairObjective, "accumulate_update", accumulate_update)
    rec = Recorder()
    fit(module, steps=3, callbacks=[ema, rec])
    assert [s for s, _ in solves] == [0, 0, 2]
    # Step 0: each micro-batch applied its own fresh alpha; the EMA took the first raw.
    first, second, third = (w for _, w in solves)
    mixes0 = calls[0]["mixes"]
    assert mixes0 is not None and all(m is not None for m in mixes0)
    np.testing.assert_allclose(calls[1]["ema"], 0.7 * first + 0.3 * second, rtol=0, atol=1e-15)
    # Step 1: no solve, one backward with the cached EMA.
    assert calls[1]["mixes"] is None
    lam_bar = 0.7 * first + 0.3 * second
    np.testing.assert_allclose(rec.records[1].weights, lam_bar, atol=1e-15)
    # Step 2: the first micro-batch solves and applies the fresh alpha, the second the EMA.
    mixes2 = calls[2]["mixes"]
    assert mixes2[0] is not None and mixes2[1] is None
    r, w = rec.records[2].r, rec.records[2].loss_weights
    fresh_r_bar, _ = affine_combination(r, w, torch.as_tensor(third, dtype=r.dtype))
    torch.testing.assert_close(mixes2[0][0], fresh_r_bar)
    cached = 0.7 * lam_bar + 0.3 * third
    np.testing.assert_allclose(rec.records[2].weights, cached, atol=1e-12)
    cached_r_bar, _ = affine_combination(r, w, torch.as_tensor(cached, dtype=r.dtype))
    torch.testing.assert_close(calls[2]["r_bar"], cached_r_bar)


def test_balance_on_is_checked(tiny_sd3_path):
    with pytest.raises(ConfigError, match="balance_on"):
        make_module(tiny_sd3_path, balance_on="first")


class Batches(Callback):
    """Keeps each step's group ids."""

    def __init__(self) -> None:
        self.group_ids: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.group_ids.append(batch["group_ids"].clone())


@pytest.mark.parametrize("clip_combined", [True, False])
def test_amortized_step_clips_the_combined_advantage(tiny_sd3_path, monkeypatch, clip_combined):
    """clip_combined_advantage: between balanced steps r_bar = clip(sum_k lambda_k A_k, a_max)
    mapped to [0, 1] (the authors' amortized step); off: the per-reward clipped r combined."""
    from marble_pl.advantages import group_advantages

    a_max = 0.3  # small, so that many |A_k| exceed it
    module = make_module(
        tiny_sd3_path,
        balance_every_n_steps=2,
        gradient_space="gramian",
        advantage_std="group",
        a_max=a_max,
        clip_combined_advantage=clip_combined,
    )
    seen: list[torch.Tensor] = []
    original = PairObjective.accumulate_update

    def accumulate_update(self, pairs, cond, r_bar, *args, **kwargs):
        seen.append(r_bar.clone())
        return original(self, pairs, cond, r_bar, *args, **kwargs)

    monkeypatch.setattr(PairObjective, "accumulate_update", accumulate_update)
    rec, batches = Recorder(), Batches()
    fit(module, steps=2, callbacks=[rec, batches])
    assert len(seen) == 1  # the balanced step applies its direction, the next one backwards
    between = rec.records[1]
    lam = torch.as_tensor(between.weights, dtype=torch.float64)
    hp = module.hparams
    adv = group_advantages(  # in the module's float32, as it computed them
        between.rewards, batches.group_ids[1], eps=hp.advantage_eps, std="group"
    ).double()
    assert (adv.abs() > a_max).any()  # the case where the two differ
    official = (0.5 + 0.5 * (adv @ lam).clamp(-a_max, a_max) / a_max).to(seen[0].dtype)
    per_reward = (between.r.double() @ lam).to(seen[0].dtype)
    assert (official - per_reward).abs().max() > 1e-3
    expected = official if clip_combined else per_reward
    # float32 r and weights: a few ulps of the [0, 1] values.
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)


def test_first_micro_batch_update_is_fresh_alpha_on_the_first_and_cached_on_the_rest(
    tiny_sd3_path, monkeypatch
):
    """The accumulated gradient of a solve step is sum_k alpha_k g_k(mb 0) with the fresh alpha
    plus sum_k lambda_bar_k g_k(mb 1) with the cached EMA, each g_k the micro-batch's own
    per-reward gradient (parameters space, the weights before the optimizer step)."""
    from marble_pl.module import MarbleModule

    module = make_module(
        tiny_sd3_path,
        balancer=MinNormBalancer(normalization="unit"),
        balance_every_n_steps=2,
        balance_on="first_micro_batch",
        micro_batch_size=3,
        gradient_space="parameters",
        advantage_std="group",
    )
    ema = CoefficientEMA(
        decay=0.7, bias_correction=False, start="first", guard="off", apply="fresh_on_solve"
    )
    stash: dict = {}
    checked: list[tuple[torch.Tensor, torch.Tensor]] = []
    solve, step = StepBalance.solve_micro_batches, MarbleModule.optimizer_step_or_skip

    def solve_micro_batches(self, pairs, cond, r, w, present):
        out = solve(self, pairs, cond, r, w, present)
        stash.update(pairs=pairs, cond=cond, r=r, w=w, fresh=out[0])
        return out

    def optimizer_step_or_skip(self, opt, trains=True):
        if self.global_step == 2:
            applied = torch.cat([p.grad.reshape(-1) for p in self.lora_params]).double()
            pairs, fresh = stash["pairs"], stash["fresh"]
            expected = torch.zeros_like(applied)
            for i, mb in enumerate(pairs.chunks(3)):
                lam = fresh[i] if fresh[i] is not None else ema.value
                g, _, _, _ = self.balancing.space.grads(
                    pairs.subset(mb), stash["cond"], stash["r"], stash["w"]
                )
                expected += torch.as_tensor(lam, dtype=torch.float64) @ g.double()
            assert fresh[0] is not None and fresh[1] is None
            checked.append((applied, expected))
        return step(self, opt, trains)

    monkeypatch.setattr(StepBalance, "solve_micro_batches", solve_micro_batches)
    monkeypatch.setattr(MarbleModule, "optimizer_step_or_skip", optimizer_step_or_skip)
    fit(module, steps=3, callbacks=[ema])
    ((applied, expected),) = checked
    # float32 forwards and backwards summed in another order: measured 4e-7; applying the fresh
    # alpha on both micro-batches instead gives 3.4e-3.
    rel = float((applied - expected).norm() / expected.norm())
    assert rel < 1e-5, rel

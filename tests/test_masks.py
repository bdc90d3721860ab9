"""Rewards that do not apply to some samples, through every piece of the training math.

A reward applies where :meth:`Reward.applicable` says (NaN elsewhere, the official convention):
its advantages use those samples only (others get ``r = 0.5``), its loss is averaged over them
(sum / n_valid, the global count), and a reward with no sample, or a zero or non-finite
gradient, leaves the QP with weight 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from marble_pl.callbacks import CoefficientEMA, GradientCosineMonitor
from masked_rewards import spec
from test_module import make_module, randomise_lora_b

from marble_pl.advantages import batch_moments, group_advantages, pooled_std
from marble_pl.balance import active_rewards
from marble_pl.balancers import MinNormBalancer
from marble_pl.data import PromptDataModule
from marble_pl.gradients import affine_combination, masked_mean_weights
from marble_pl.nft import nft_loss, nft_output_grad, nft_output_stats, output_gram
from marble_pl.updates import trains_any_reward

# Each reward applies to a different subset of the prompts (any 3 of them hold each reward).
PROMPTS = [
    "alpha beta: a red apple on a table",
    "beta gamma: a blue car in the rain",
    "alpha: a green tree on a hill",
    "gamma: a white boat at sea",
]
REWARDS = [
    spec("a", ["alpha"], "brightness"),
    spec("b", ["beta"], "red"),
    spec("c", ["gamma"], "contrast"),
]
NEVER = spec("never", ["zzz"], "brightness")

# float32 round-off: the module and the reference sum the same float32 terms in other orders
# (micro-batches of 4 pairs against one batch; the taps' per-sample einsum against autograd's
# weight gradient), each an accumulation over a few hundred terms: relative errors of order
# 1e2-1e3 * eps(float32) = 1e-5 .. 1e-4 of the largest entry. Measured: see the report.
GRAD_RTOL = 1e-4


def fit_on(module, tmp_path: Path, steps: int = 1, callbacks=None, batch_size: int = 3):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
        num_sanity_val_steps=0,
    )
    data = PromptDataModule(str(prompts), batch_size=batch_size, group_size=3, seed=0)
    trainer.fit(module, data)
    return trainer


class Reference(Callback):
    """Before the update: autograd of each reward's masked loss (sum over its valid pairs /
    n_valid), in parameter space and w.r.t. the transformer's output, on one batch of all
    pairs; after the backward, the gradient handed to the optimizer."""

    def __init__(self, module) -> None:
        pairs_fn, rollout_fn = module.training_pairs, module.rollout_batch

        def training_pairs(x0):
            self.pairs = pairs_fn(x0)
            return self.pairs

        def rollout_batch(prompts):
            out = rollout_fn(prompts)
            self.cond = (out.prompt_embeds, out.pooled_prompt_embeds)
            return out

        module.training_pairs, module.rollout_batch = training_pairs, rollout_batch

    def on_marble_gradients(self, trainer, module, ctx) -> None:
        self.r, self.applicable, self.rewards = ctx.r.clone(), ctx.applicable.clone(), ctx.rewards
        pairs = self.pairs
        v_theta, v_old, v_target, kw = module.balancing.space.objective.pair_forward(
            pairs, slice(0, len(pairs)), self.cond, v_old=None
        )
        losses = nft_loss(v_theta, v_old, v_target, ctx.r[pairs.image], module.hparams.beta, **kw)
        valid = ctx.applicable[pairs.image]
        params, grads, outs = module.lora_params, [], []
        for k in range(losses.shape[1]):
            objective = losses[valid[:, k], k].mean()  # the masked mean, sum / n_valid
            g = torch.autograd.grad(objective, [*params, v_theta], retain_graph=True)
            grads.append(torch.cat([x.reshape(-1) for x in g[:-1]]))
            outs.append(g[-1].reshape(-1))
        self.grads, self.outputs = torch.stack(grads), torch.stack(outs)

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.applied = torch.cat([p.grad.reshape(-1).clone() for p in module.lora_params])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def expected_r(rewards, applicable, group_ids, eps, a_max) -> torch.Tensor:
    """Per reward: group mean and global (population) std over its applicable samples only."""
    r = torch.full(rewards.shape, 0.5, dtype=torch.float64)
    for k in range(rewards.shape[1]):
        ok = applicable[:, k]
        vals = rewards[ok, k].double()
        std = vals.std(unbiased=False)
        for i in torch.nonzero(ok).flatten().tolist():
            same = ok & (group_ids == group_ids[i])
            adv = (rewards[i, k].double() - rewards[same, k].double().mean()) / (std + eps)
            r[i, k] = 0.5 + 0.5 * float(adv.clamp(-a_max, a_max)) / a_max
    return r


@pytest.mark.parametrize("space", ["parameters", "gramian", "output"])
def test_per_reward_gradients_are_autograd_of_the_masked_losses(tiny_sd3_path, tmp_path, space):
    module = make_module(
        tiny_sd3_path,
        rewards=REWARDS,
        gradient_space=space,
        timesteps_per_image=2,
        micro_batch_size=4,  # 18 pairs: 5 micro-batches
        advantage_std="global",
        old_policy_decay=1.0,
    )
    randomise_lora_b(module)
    ref = Reference(module)
    fit_on(module, tmp_path, steps=1, callbacks=[ref])
    rec = module.last_step
    app = ref.applicable
    assert app.shape == (9, 3) and app.any(0).all() and not app.all(0).any()
    assert len({tuple(app[:, k].tolist()) for k in range(3)}) == 3  # three different subsets
    # advantages over the applicable samples only; r = 0.5 elsewhere
    groups = torch.arange(9) // 3
    hp = module.hparams
    want = expected_r(rec.rewards, app, groups, hp.advantage_eps, hp.a_max)
    torch.testing.assert_close(rec.r.double(), want, atol=1e-5, rtol=0)
    assert torch.all(rec.r[~app] == 0.5) and not torch.all(rec.r[app] == 0.5)
    assert rec.balance.active.all()
    if space == "output":  # the per-reward gradients w.r.t. the output, through their Gram
        m_ref = ref.outputs.double() @ ref.outputs.double().T
        figure = rel(rec.gram, m_ref)
    else:
        figure = max(rel(rec.grads[k], ref.grads[k]) for k in range(3))
    print(f"\n{space}: max relative difference of the per-reward gradients: {figure:.2e}")
    assert figure < GRAD_RTOL, figure
    # the ONE update: sum_k lambda_k g_k, each g_k with its own denominator
    lam = torch.as_tensor(rec.weights, dtype=torch.float64)
    d_ref = lam @ ref.grads.double()
    update = rel(ref.applied, d_ref)
    print(f"{space}: update vs sum_k lambda_k g_k: {update:.2e}")
    assert update < GRAD_RTOL, update


def test_a_reward_without_samples_has_weight_zero_and_nothing_is_nan(tiny_sd3_path, tmp_path):
    module = make_module(
        tiny_sd3_path,
        rewards=[REWARDS[0], REWARDS[1], NEVER],
        gradient_space="output",
        advantage_std="global",
    )
    randomise_lora_b(module)
    ema, monitor = CoefficientEMA(decay=0.5), GradientCosineMonitor(audit_every_n_steps=1)
    before = torch.cat([p.detach().reshape(-1).clone() for p in module.lora_params])
    trainer = fit_on(module, tmp_path, steps=2, callbacks=[ema, monitor])
    rec = module.last_step
    assert rec.weights_raw[2] == 0 and rec.weights[2] == 0
    assert rec.balance.active.tolist() == [True, True, False]
    assert not rec.balance.fallback and rec.weights_raw[:2].sum() == pytest.approx(1.0)
    assert torch.all(rec.r[:, 2] == 0.5) and torch.isfinite(rec.r).all()
    assert torch.isfinite(rec.gram).all() and np.isfinite(ema.value).all()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["rewards/never/applicable"] == 0.0
    assert metrics["rewards/a/applicable"] > 0 and metrics["rewards/b/applicable"] > 0
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert "reward/never/mean" not in metrics and "cos/never" not in metrics
    assert "cos_exact/never" not in monitor.last and "cos/a" in metrics
    assert monitor.steps == 2  # the two other rewards were balanced and monitored
    assert module.counters["skipped_no_reward"] == 0
    after = torch.cat([p.detach().reshape(-1) for p in module.lora_params])
    assert not torch.equal(before, after)


@pytest.mark.parametrize(("space", "kl_beta"), [("output", 0.1), ("parameters", 0.1)])
def test_no_reward_with_samples_skips_the_update(tiny_sd3_path, tmp_path, space, kl_beta):
    """All out: no reward applies anywhere; the KL term alone is not applied."""
    never2 = {**NEVER, "init_args": {**NEVER["init_args"], "name": "never2"}}
    module = make_module(
        tiny_sd3_path, rewards=[NEVER, never2], gradient_space=space, kl_beta=kl_beta
    )
    randomise_lora_b(module)
    before = torch.cat([p.detach().reshape(-1).clone() for p in module.lora_params])
    trainer = fit_on(module, tmp_path, steps=1)
    rec = module.last_step
    assert rec.balance.status == "no_sample" and not rec.balance.active.any()
    np.testing.assert_array_equal(rec.weights, [0.0, 0.0])
    assert module.counters["skipped_no_reward"] == 1
    after = torch.cat([p.detach().reshape(-1) for p in module.lora_params])
    assert torch.equal(before, after)
    assert all(math.isfinite(float(v)) for v in trainer.callback_metrics.values())


def combined_objective(module, ctx, w: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r [N], valid [N])`` of ``R @ w`` renormalised per sample over its applicable rewards."""
    rewards, app = ctx.rewards.double(), ctx.applicable
    wm = app.double() * (torch.tensor(w, dtype=torch.float64) / sum(w))
    valid = wm.sum(1) > 0
    s = torch.where(app, rewards, 0.0).mul(wm).sum(1) / wm.sum(1).clamp_min(1e-300)
    hp = module.hparams
    groups = ctx.group_ids.cpu()
    r = expected_r(s[:, None], valid[:, None], groups, hp.advantage_eps, hp.a_max)[:, 0]
    return r, valid


class UpdateSpy(Callback):
    """Before the update: the ``r`` applied, and the exact gradient of the combined loss
    averaged over its valid pairs, at the ``r`` recomputed here; then the applied gradient."""

    def __init__(self, w: list[float]) -> None:
        self.w = w

    def on_marble_gradients(self, trainer, module, ctx) -> None:
        self.r_applied, self.applicable = ctx.r_applied.clone(), ctx.applicable.clone()
        self.r_want, self.valid = combined_objective(module, ctx, self.w)
        self.wm = ctx.applicable.double() * torch.tensor(self.w, dtype=torch.float64)
        n_pairs = float(self.valid.sum()) * module.timesteps_count
        weights = (self.valid.double() / n_pairs)[:, None]
        self.d_want = ctx.param_grads(self.r_want[:, None].to(ctx.r.dtype), weights)[0]

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.applied = torch.cat([p.grad.reshape(-1).clone() for p in module.lora_params])


@pytest.mark.parametrize(
    ("balancer", "w"), [("weighted_sum", [1.0, 2.0, 1.0]), ("single", [0.0, 1.0, 0.0])]
)
@pytest.mark.parametrize("space", ["output", "parameters"])
def test_baselines_mix_the_rewards_that_apply_to_each_sample(
    tiny_sd3_path, tmp_path, balancer, w, space
):
    """``R @ w`` with ``w`` renormalised per sample over the rewards that apply to it; a sample
    none of whose weighted rewards applies is neutral (``r = 0.5``) and outside the loss's
    mean; the update is the gradient of the combined loss averaged over its valid samples."""
    module = make_module(
        tiny_sd3_path,
        rewards=REWARDS,
        balancer=balancer,
        reward_weights=w,
        single_reward=1,
        gradient_space=space,
        advantage_std="global",
        timesteps_per_image=2,
    )
    randomise_lora_b(module)
    spy = UpdateSpy(w)
    fit_on(module, tmp_path, steps=1, callbacks=[spy])
    torch.testing.assert_close(spy.r_applied.double(), spy.r_want, atol=1e-5, rtol=0)
    assert torch.all(spy.r_applied[~spy.valid] == 0.5)
    if balancer == "single":  # b applies to some prompts only
        assert not spy.valid.all()
    else:  # samples see different subsets of the weights: the renormalisation matters
        assert len(set(spy.wm.sum(1).tolist())) > 1
    assert rel(spy.applied, spy.d_want) < GRAD_RTOL


# ---------------------------------------------------------------- the pure pieces


def test_masked_advantages_use_the_applicable_samples_only():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 3, generator=gen)
    groups = torch.arange(12) // 3
    mask = torch.ones(12, 3, dtype=torch.bool)
    mask[:6, 0] = False  # reward 0: groups 2 and 3 only
    mask[[0, 4, 8], 1] = False  # reward 1: one sample of groups 0, 1, 2 missing
    mask[3:6, 2] = False
    noisy = torch.where(mask, rewards, torch.full_like(rewards, float("nan")))  # NaN elsewhere
    sigma = pooled_std(batch_moments(noisy, mask))
    adv = group_advantages(noisy, groups, eps=1e-4, global_std=sigma, mask=mask)
    assert torch.isfinite(adv).all() and torch.all(adv[~mask] == 0)
    want = (expected_r(rewards, mask, groups, 1e-4, 1e9) - 0.5) * 2e9
    torch.testing.assert_close(adv.double(), want, rtol=1e-5, atol=1e-5)
    group = group_advantages(noisy, groups, std="group", mask=mask)
    assert torch.isfinite(group).all() and torch.all(group[~mask] == 0)
    # a reward applying nowhere: std 0, advantages 0, no error
    empty = torch.zeros(12, 3, dtype=torch.bool)
    assert torch.all(pooled_std(batch_moments(noisy, empty), allow_empty=True) == 0)
    assert torch.all(group_advantages(noisy, groups, mask=empty) == 0)


def test_affine_combination_equals_the_weighted_sum_of_the_masked_losses():
    gen = torch.Generator().manual_seed(1)
    n, k = 10, 3
    r = torch.rand(n, k, generator=gen, dtype=torch.float64)
    a, b = torch.randn(n, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen)
    mask = torch.rand(n, k, generator=gen) > 0.4
    mask[:, 2] = False  # a reward with no sample
    w = masked_mean_weights(mask, mask.sum(0))
    lam = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    r_bar, c = affine_combination(r, w, lam)
    per_reward = (w * (r * a[:, None] + b.double()[:, None])).sum(0)  # L_k = sum_i w_ik l_i
    torch.testing.assert_close((c * (r_bar * a + b)).sum(), lam @ per_reward)
    assert torch.all((r_bar >= 0) & (r_bar <= 1))
    assert torch.all(c[~mask[:, :2].any(1)] == 0) and torch.all(r_bar[c == 0] == 0.5)
    torch.testing.assert_close(w.sum(0), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))


def test_weighted_output_gram_equals_the_explicit_gram():
    gen = torch.Generator().manual_seed(2)
    v_theta, v_old, v_target = (torch.randn(6, 4, 3, 3, generator=gen) for _ in range(3))
    r = torch.rand(6, 3, generator=gen)
    w = masked_mean_weights(torch.rand(6, 3, generator=gen) > 0.3, torch.tensor([3.0, 2, 4]))
    w = w.float()
    stats = nft_output_stats(v_theta, v_old, v_target, 0.5)
    g = nft_output_grad(v_theta, v_old, v_target, r, 0.5).double()  # [K, N, ...]
    g = (g * w.t().double().reshape(3, 6, 1, 1, 1)).reshape(3, -1)
    torch.testing.assert_close(output_gram(stats, r, weights=w), g @ g.T)
    d_r, d_w = torch.rand(6, 1, generator=gen), torch.rand(6, 1, generator=gen)
    d = (
        nft_output_grad(v_theta, v_old, v_target, d_r, 0.5).double()[0]
        * d_w.double()[:, :, None, None]
    )
    cross = output_gram(stats, r, d_r, weights=w, weights_other=d_w)
    torch.testing.assert_close(cross[:, 0], g @ d.reshape(-1))


def test_rewards_without_samples_or_usable_gradients_leave_the_qp():
    gen = np.random.default_rng(0)
    g = gen.standard_normal((4, 6))
    g[1] *= 1e-13  # norm <= 1e-12: out
    m = g @ g.T
    assert active_rewards(m).tolist() == [True, False, True, True]
    present = np.array([True, True, True, False])
    assert active_rewards(m, present).tolist() == [True, False, True, False]
    balancer = MinNormBalancer()
    balancer.bind(["a", "b", "c", "d"])
    res = balancer.balance(m, present=present)
    assert res.active.tolist() == [True, False, True, False]
    assert res.weights[1] == 0 and res.weights[3] == 0 and res.weights.sum() == pytest.approx(1)
    sub = MinNormBalancer()
    sub.bind(["a", "c"])
    np.testing.assert_allclose(res.weights[[0, 2]], sub(m[np.ix_([0, 2], [0, 2])]).weights)
    assert balancer.warm_start.shape == (4,)  # kept full-size for the next full solve
    bad = m.copy()
    bad[2, 2] = np.nan
    assert not balancer.balance(bad).active[2]
    none = balancer.balance(m, present=np.zeros(4, dtype=bool))
    assert none.status == "no_sample" and not none.weights.any()
    assert balancer.balance(m * 1e-30).status == "no_active_reward"
    assert balancer.balance(np.zeros((4, 4))).status == "zero_gram"
    assert balancer.balance(np.full((4, 4), np.nan)).status == "nonfinite_gram"


def test_coefficient_ema_with_rewards_out_of_the_qp():
    ema = CoefficientEMA(decay=0.5, guard="project")
    ema.update(np.array([0.2, 0.3, 0.5]))
    g = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, np.nan]])  # reward 2: no usable gradient
    m = np.zeros((3, 3))
    m[:2, :2] = g[:2] @ g[:2].T
    m[2, 2] = np.nan
    active = np.array([True, True, False])
    applied = ema.update(np.array([0.5, 0.5, 0.0]), m, active)
    assert np.isfinite(applied).all() and applied[2] == 0 and applied.sum() == pytest.approx(1)
    value = (0.25 * np.array([0.2, 0.3, 0.5]) + 0.5 * np.array([0.5, 0.5, 0.0])) / 0.75
    np.testing.assert_allclose(ema.value, value)  # bias-corrected; the 0 is folded in
    np.testing.assert_allclose(applied[:2], value[:2] / value[:2].sum())
    # nothing active: nothing folded in, zeros applied
    kept = ema.value.copy()
    assert not ema.update(np.zeros(3), m, np.zeros(3, dtype=bool)).any()
    np.testing.assert_array_equal(ema.value, kept)


def test_applicability_and_the_means_per_source_are_logged(tiny_sd3_path):
    module = make_module(tiny_sd3_path, rewards=REWARDS)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    metadata = [{"source": "pick score"}, {"source": "ocr"}, {}]
    applicable = module.applicability(prompts, metadata)
    assert applicable.tolist() == [[True, True, False], [False, True, True], [False, False, True]]
    rewards = torch.tensor([[0.1, 0.2, 9.0], [9.0, 0.4, 0.5], [9.0, 9.0, 0.7]])
    logged: dict[str, float] = {}
    module.log_dict = lambda values, **kw: logged.update(values)
    module.step_log.log_applicability(rewards, ~applicable, applicable.sum(0).double(), metadata, 3)
    assert logged == {
        "rewards/a/applicable": 1.0,
        "rewards/b/applicable": 2.0,
        "rewards/c/applicable": 2.0,
        "reward_by_source/a/pick_score": pytest.approx(0.1),
        "reward_by_source/b/pick_score": pytest.approx(0.2),
        "reward_by_source/b/ocr": pytest.approx(0.4),
        "reward_by_source/c/ocr": pytest.approx(0.5),
    }


class Grams(Callback):
    def __init__(self) -> None:
        self.grams: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.grams.append(pl_module.last_step.gram.clone())


def test_lagged_balance_folds_the_same_masked_gram(tiny_sd3_path, tmp_path):
    """The lagged balance takes the batch's Gram from the update's own forwards: with masks it
    is the Gram the exact balance computes first (same weights, same samples)."""
    runs = []
    for lagged in (False, True):
        module = make_module(
            tiny_sd3_path,
            rewards=REWARDS,
            micro_batch_size=4,
            lagged_balance=lagged,
            advantage_std="global",
            old_policy_decay=1.0,
        )
        randomise_lora_b(module)
        grams = Grams()
        fit_on(module, tmp_path, steps=2, callbacks=[grams])
        runs.append(grams.grams)
    for exact, lagged in zip(*runs, strict=True):
        assert rel(lagged, exact) < 1e-5  # float32 statistics summed in another order


def test_earlier_coefficients_apply_to_the_rewards_present_only(tiny_sd3_path):
    module = make_module(tiny_sd3_path, rewards=REWARDS)
    module.balancer.warm_start = np.array([0.2, 0.3, 0.5])
    raw, applied, _ = module.balancing.previous_coefficients(np.array([True, True, False]))
    np.testing.assert_allclose(raw, [0.2, 0.3, 0.5])
    np.testing.assert_allclose(applied, [0.4, 0.6, 0.0])
    _, none, _ = module.balancing.previous_coefficients(np.zeros(3, dtype=bool))
    assert not none.any() and not trains_any_reward(none, np.ones(3, dtype=bool))

"""MarbleModule: one training step is the algorithm of ARCHITECTURE §2."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from marble_pl.callbacks import CoefficientEMA

from marble_pl.data import PromptDataModule
from marble_pl.module import MarbleModule, NonFiniteRewardError
from marble_pl.rewards import Reward, register_reward

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "tiny_train.txt"


def make_module(path: Path, **overrides) -> MarbleModule:
    kwargs = dict(
        pretrained_model_name_or_path=str(path),
        local_files_only=True,
        rewards=["brightness", "saturation", "compressibility"],
        lora_rank=4,
        lora_alpha=8.0,
        num_inference_steps=3,
        guidance_scale=1.0,
        resolution=32,
        max_sequence_length=16,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        gradient_clip_norm=None,
    )
    kwargs.update(overrides)
    return MarbleModule(**kwargs)


def fit(module: MarbleModule, steps: int = 1, callbacks=None) -> Trainer:
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, PromptDataModule(str(PROMPTS), batch_size=2, group_size=3, seed=0))
    return trainer


def randomise_lora_b(module: MarbleModule, adapters: tuple[str, ...] = ("default",)) -> None:
    """Seeded LoRA (A from peft, B drawn here): v_theta != base, the same in any test order.

    The trained adapter's B is drawn; every other adapter named gets the same values."""
    torch.manual_seed(0)  # peft draws LoRA A from the global RNG: any test order
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            if "lora_B.default" in name:
                params[name].normal_(0, 0.05, generator=gen)
                for adapter in adapters:
                    params[name.replace(".default.", f".{adapter}.")].copy_(params[name])


def nan_on_first_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the first velocity computed with gradients NaN (one non-finite update)."""
    original, calls = MarbleModule.velocity, {"n": 0}

    def velocity(self, x_t, t, embeds, pooled):
        v = original(self, x_t, t, embeds, pooled)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 1:
                return v * float("nan")
        return v

    monkeypatch.setattr(MarbleModule, "velocity", velocity)


def snapshot(module: MarbleModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_only_lora_changes_and_sampling_policy_follows_ema(tiny_sd3_path):
    module = make_module(tiny_sd3_path, old_policy_decay=0.7)
    torch.manual_seed(0)  # peft draws LoRA A from the global RNG: any test order
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    # LoRA B starts at zero: give it a value so v_theta != base and the old adapter is visible.
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "lora_B.default" in name:
                p.normal_(0, 0.05, generator=gen)
    before = snapshot(module)
    fit(module, steps=1)
    after = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was trained"
    assert all("lora_" in k for k in changed), sorted(changed)[:5]
    assert any(".default." in k for k in changed)
    for key in before:
        if ".old." not in key:
            continue
        src = key.replace(".old.", ".default.")
        expected = 0.7 * before[key] + 0.3 * after[src]
        torch.testing.assert_close(after[key], expected)
    frozen = [k for k in before if "lora_" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)


class Recorder(Callback):
    """Keeps the LoRA weights before each step and the module's record after it."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []
        self.records: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append([p.detach().clone() for p in pl_module.lora_params])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records.append(copy.deepcopy(pl_module.last_step))


def test_parameters_mode_applies_ema_weighted_sum_of_reward_gradients(tiny_sd3_path):
    # group std: every reward keeps a comparable gradient, so lambda* is interior and moves
    module = make_module(
        tiny_sd3_path, gradient_space="parameters", old_policy_decay=1.0, advantage_std="group"
    )
    ema, rec_cb = CoefficientEMA(decay=0.5, guard=False), Recorder()
    torch.manual_seed(0)  # peft draws LoRA A from the global RNG: the same start in any test order
    module.configure_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "lora_B.default" in name:
                p.normal_(0, 0.05, generator=gen)
    fit(module, steps=2, callbacks=[ema, rec_cb])
    first, rec = rec_cb.records
    assert rec.grads is not None and rec.grads.shape[0] == 3
    # lambda_bar of the bias-corrected EMA after two steps, from the raw QP solutions.
    m = 0.5 * (0.5 * first.weights_raw) + 0.5 * rec.weights_raw
    np.testing.assert_allclose(rec.weights, m / (1 - 0.25), atol=1e-12)
    np.testing.assert_allclose(ema.value, rec.weights)
    assert not np.allclose(rec.weights, rec.weights_raw)
    assert abs(rec.weights.sum() - 1) < 1e-9 and np.all(rec.weights >= 0)
    expected = torch.as_tensor(rec.weights, dtype=rec.grads.dtype) @ rec.grads
    before = rec_cb.before[1]
    delta = torch.cat(
        [(b - p.detach()).reshape(-1) for b, p in zip(before, module.lora_params, strict=True)]
    )
    torch.testing.assert_close(delta, 0.5 * expected, atol=1e-6, rtol=1e-5)
    # The min-norm direction conflicts with no reward (raw lambda*, before the EMA).
    d = torch.as_tensor(rec.weights_raw, dtype=rec.grads.dtype) @ rec.grads
    assert torch.all(rec.grads.double() @ d.double() >= -1e-9)


def test_output_mode_uses_raw_coefficients_without_callback(tiny_sd3_path):
    module = make_module(tiny_sd3_path)
    fit(module, steps=1)
    rec = module.last_step
    assert rec.grads is None and rec.gram is not None and rec.gram.shape == (3, 3)
    np.testing.assert_array_equal(rec.weights, rec.weights_raw)
    assert rec.balance is not None and rec.balance.status == "solved"


class UpdateSpy(Callback):
    """Before the update: the LoRA weights, the ``r`` applied, and the exact NFT gradient of the
    step's loss at ``r_fn(ctx)`` (an independent recomputation of the ``r`` to train on)."""

    def __init__(self, r_fn) -> None:
        self.r_fn = r_fn

    def on_marble_gradients(self, trainer, pl_module, ctx) -> None:
        self.before = flat_lora(pl_module)
        self.r_applied = ctx.r_applied.detach().clone()
        self.r_expected = self.r_fn(pl_module, ctx)
        self.grad = ctx.param_grads(self.r_expected[:, None].to(ctx.r.dtype))[0]


def flat_lora(module: MarbleModule) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.lora_params])


def r_of_combined_reward(module: MarbleModule, ctx, w) -> torch.Tensor:
    """DiffusionNFT's optimality probability of ONE reward ``R @ w`` (group mean, batch std).

    Non-finite scores of a reward with ``w_k > 0`` make the sample neutral (``r = 0.5``) after
    taking their group's mean of the finite scores."""
    hp = module.hparams
    rewards, groups = ctx.rewards.double(), ctx.group_ids
    w = torch.as_tensor(w, dtype=torch.float64)
    bad = ~torch.isfinite(rewards)
    for k in range(rewards.shape[1]):
        for i in torch.nonzero(bad[:, k]).flatten().tolist():
            same = (groups == groups[i]) & ~bad[:, k]
            rewards[i, k] = rewards[same, k].mean()
    s = rewards @ w
    means = torch.stack([s[groups == g].mean() for g in groups.tolist()])
    adv = (s - means) / (s.std(unbiased=False) + hp.advantage_eps)
    r = 0.5 + 0.5 * adv.clamp(-hp.a_max, hp.a_max) / hp.a_max
    return torch.where(bad[:, w > 0].any(1), torch.full_like(r, 0.5), r)


def assert_trained_on(module: MarbleModule, spy: UpdateSpy, lr: float = 0.5) -> None:
    """The step applied ``r_expected`` and moved the LoRA by ``-lr * grad`` (plain SGD)."""
    # float32 in the module (group means of close rewards): agreement to ~2e-6 measured
    torch.testing.assert_close(spy.r_applied.double(), spy.r_expected, atol=1e-5, rtol=0)
    assert not torch.allclose(spy.r_expected, torch.full_like(spy.r_expected, 0.5))
    delta = flat_lora(module) - spy.before
    torch.testing.assert_close(delta, -lr * spy.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("balancer", ["weighted_sum", "single"])
@pytest.mark.parametrize("space", ["output", "parameters"])
def test_baselines_train_on_the_combined_reward(tiny_sd3_path, balancer, space):
    """The baselines' ONE update is the NFT gradient at ``r`` of ``R @ w`` (``w`` one-hot for
    ``single``), recomputed here from the step's rewards."""
    module = make_module(
        tiny_sd3_path,
        balancer=balancer,
        gradient_space=space,
        reward_weights=[1.0, 2.0, 1.0],
        single_reward=1,
    )
    randomise_lora_b(module)
    w = [0.25, 0.5, 0.25] if balancer == "weighted_sum" else [0.0, 1.0, 0.0]
    spy = UpdateSpy(lambda m, ctx: r_of_combined_reward(m, ctx, w))
    fit(module, steps=1, callbacks=[spy])
    rec = module.last_step
    assert rec.r_train.shape[1] == 1 and rec.r.shape[1] == 3 and rec.balance is None
    np.testing.assert_allclose(module.step_log.effective_weights(rec.weights), w)
    assert_trained_on(module, spy)


@register_reward("test_nan_on_first")
class NanOnFirst(Reward):
    """Brightness, but NaN for the first image of the batch (a broken reward model)."""

    def forward(self, images, prompts):
        out = images.mean(dim=(1, 2, 3)).float()
        out[0] = float("nan")
        return out


def test_nonfinite_reward_is_an_error_naming_the_reward(tiny_sd3_path):
    module = make_module(tiny_sd3_path, rewards=["brightness", "test_nan_on_first"])
    with pytest.raises(NonFiniteRewardError, match="test_nan_on_first.*nonfinite_rewards: drop"):
        fit(module, steps=1)


def test_nonfinite_reward_dropped_and_counted(tiny_sd3_path):
    module = make_module(
        tiny_sd3_path, rewards=["brightness", "test_nan_on_first"], nonfinite_rewards="drop"
    )
    fit(module, steps=1)
    rec = module.last_step
    assert module.counters["nonfinite_rewards"] == 1
    assert rec.r[0, 1] == 0.5 and torch.isfinite(rec.r).all()


@pytest.mark.parametrize(
    ("balancer", "w"), [("weighted_sum", [0.5, 0.25, 0.25]), ("single", [1.0, 0.0, 0.0])]
)
def test_nonfinite_reward_dropped_under_the_baselines(tiny_sd3_path, balancer, w):
    """``nonfinite_rewards: drop`` with one estimator on ``R @ w``: the NaN score takes its
    group's mean; the sample is neutral (``r = 0.5``) only if its bad reward has ``w_k > 0``."""
    module = make_module(
        tiny_sd3_path,
        rewards=["brightness", "test_nan_on_first", "saturation"],
        nonfinite_rewards="drop",
        balancer=balancer,
        reward_weights=[2.0, 1.0, 1.0],
        single_reward=0,
        gradient_space="parameters",
    )
    randomise_lora_b(module)
    spy = UpdateSpy(lambda m, ctx: r_of_combined_reward(m, ctx, w))
    fit(module, steps=1, callbacks=[spy])
    assert module.counters["nonfinite_rewards"] == 1
    assert torch.isnan(module.last_step.rewards[0, 1])
    assert (spy.r_applied[0] == 0.5) == (balancer == "weighted_sum")
    assert_trained_on(module, spy)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"rewards": ["brightnes"]}, "brightness"),
        ({"reward_weights": [1.0, 2.0]}, "one weight per reward"),
        ({"beta": 0.0}, "beta"),
        ({"a_max": -1.0}, "a_max"),
        ({"balancer": "sum"}, "balancer"),
        ({"t_min": 0.5, "t_max": 0.2}, "t_min"),
    ],
)
def test_bad_configuration_is_rejected_early(tiny_sd3_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_module(tiny_sd3_path, **overrides)


def test_resolution_must_fit_the_model(tiny_sd3_path):
    module = make_module(tiny_sd3_path, resolution=30)
    with pytest.raises(ValueError, match="multiple of"):
        module.configure_model()


def test_detail_metrics_reach_the_logger_on_its_steps_only(tiny_sd3_path):
    """With log_every_n_steps=2 the logger gets the per-reward details at steps 2 and 4 (and the
    progress-bar reward means every step); step 1's details are never assembled."""
    from lightning.pytorch.loggers import Logger

    class Capture(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "capture"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            self.rows.append((step, dict(metrics)))

    logger = Capture()
    seen: list[set[str]] = []
    stored: list[bool] = []

    class Keys(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            seen.append(set(trainer.progress_bar_metrics))
            stored.append("lambda/brightness" in trainer.callback_metrics)

    module = make_module(tiny_sd3_path)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=logger,
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Keys()],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, PromptDataModule(str(PROMPTS), batch_size=2, group_size=3, seed=0))
    with_lambda = [step for step, row in logger.rows if "lambda/brightness" in row]
    assert with_lambda == [1, 3]  # Lightning's logger step is 0-based: steps 2 and 4
    for step, row in logger.rows:
        if step in with_lambda:
            assert {"reward/saturation/mean", "reward/saturation/std", "loss"} <= set(row)
    assert all({f"reward/{n}/mean" for n in module.reward_names} <= keys for keys in seen)
    assert len(seen) == 4
    assert stored[0] is False  # step 1 is not a logging step: its details were not assembled


class BalanceSpy(Callback):
    """The step's per-reward gradients, losses and ``lambda*`` as the balancer received them."""

    def on_marble_gradients(self, trainer, pl_module, ctx) -> None:
        self.grads = ctx.grads.double().clone()
        self.losses = ctx.losses.double().clone()
        self.weights_raw = np.asarray(ctx.weights_raw, dtype=np.float64)


@pytest.mark.parametrize("normalization", ["none", "l2", "loss"])
def test_normalization_through_the_module(tiny_sd3_path, normalization):
    """``lambda*`` is the min-norm point of ``{g_k / s_k}`` (Frank-Wolfe here, not OSQP) mapped
    back to the raw gradients: ``lambda_k ∝ w_k / s_k``, with ``s_k = ||g_k||`` (l2) or the
    reward's loss (loss)."""
    from marble_pl.balance import frank_wolfe_min_norm

    module = make_module(tiny_sd3_path, gradient_space="parameters", normalization=normalization)
    randomise_lora_b(module)
    spy = BalanceSpy()
    fit(module, steps=1, callbacks=[spy])
    g = spy.grads
    s = {
        "none": torch.ones(g.shape[0], dtype=torch.float64),
        "l2": g.norm(dim=1),
        "loss": spy.losses.abs(),
    }[normalization]
    gn = g / s[:, None]
    m = (gn @ gn.T).numpy()
    w = frank_wolfe_min_norm(m / np.trace(m), tol=1e-18)
    lam = w / s.numpy()
    lam = lam / lam.sum()
    atol = 1e-8  # measured <= 1.4e-11
    np.testing.assert_allclose(spy.weights_raw, lam, atol=atol)
    np.testing.assert_allclose(module.last_step.weights_raw, spy.weights_raw)
    m_raw = (g @ g.T).numpy()
    lam_none = frank_wolfe_min_norm(m_raw / np.trace(m_raw), tol=1e-18)
    # The normalisation moves lambda from none's by far more than the tolerance, so the check
    # above tells them apart: by 0.26 (l2) and 3.3e-6 (loss: the rewards' NFT losses are mixtures
    # weighted by r, whose mean is about 1/2 for every reward, so they differ by ~1e-5).
    moved = np.abs(lam - lam_none).max()
    assert moved < atol if normalization == "none" else moved > 100 * atol

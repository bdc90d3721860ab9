"""DiffusionNFT's recipe inside MARBLE: many timesteps per image from the sampler's schedule,
micro-batches accumulating into ONE update balanced on the whole batch, the KL term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from marble_pl.callbacks import CoefficientEMA
from test_module import PROMPTS, fit, make_module

from marble_pl.data import read_prompts
from marble_pl.errors import ConfigError
from marble_pl.models import use_adapter
from marble_pl.rollout import schedule_sigmas
from marble_pl.timesteps import check_timesteps, draw_timesteps, timesteps_per_image_count

LR = 0.5  # make_module's SGD: a step moves the LoRA by -LR * gradient


# ----------------------------------------------------------------------- pure pieces


def test_timesteps_per_image_is_a_count_or_a_fraction_of_the_sampler_steps():
    assert timesteps_per_image_count(3, 10) == 3
    assert timesteps_per_image_count(0.99, 10) == 9  # DiffusionNFT: int(0.99 * 10)
    assert timesteps_per_image_count(0.99, 25) == 24  # ... and its multi-reward 25 steps
    assert timesteps_per_image_count(0.3, 10) == 3
    assert timesteps_per_image_count(0.01, 10) == 1
    for bad in (0, 1.5, 0.0, True):
        with pytest.raises(ConfigError, match="model.timesteps_per_image"):
            timesteps_per_image_count(bad, 10)
    with pytest.raises(ConfigError, match="at most 4"):
        check_timesteps(5, "sampler", 4)
    assert check_timesteps(5, "uniform", 4) == 5
    with pytest.raises(ConfigError, match="timestep_sampling"):
        check_timesteps(1, "logit_normal", 4)


def test_draws_are_distinct_schedule_entries_or_uniform_in_range():
    sigmas = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.2])
    g = torch.Generator().manual_seed(0)
    t = draw_timesteps(g, 4, "sampler", sigmas)
    assert len(set(t.tolist())) == 4 and set(t.tolist()) <= set(sigmas.tolist())
    u = draw_timesteps(torch.Generator().manual_seed(0), 1000, "uniform", sigmas, 0.2, 0.6)
    assert float(u.min()) >= 0.2 and float(u.max()) <= 0.6 and abs(float(u.mean()) - 0.4) < 0.02


# ----------------------------------------------------------------------- in the module


def seeded_lora(module, seed: int = 0) -> None:
    """Seeded random LoRA A and B, the other adapters equal to the trained one, so every
    module built this way starts from the same state (peft draws A from the global RNG)."""
    module.configure_model()
    g = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            if ".default." in name and ("lora_A" in name or "lora_B" in name):
                params[name].copy_(0.05 * torch.randn(params[name].shape, generator=g))
        for name in params:  # the sampling (and evaluation EMA) adapters start as the trained
            for copy in (".old.", ".ema."):
                if copy in name and ("lora_A" in name or "lora_B" in name):
                    params[name].copy_(params[name.replace(copy, ".default.")])


class FirstBatch(Callback):
    """Keeps the first batch's prompts."""

    prompts: list[str] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.prompts is None:
            self.prompts = list(batch["prompts"])


def one_step(path, **overrides):
    """(LoRA gradient of the step, module, the step's prompts): SGD moves by -LR * gradient."""
    module = make_module(path, **overrides)
    seeded_lora(module)
    before = [p.detach().clone() for p in module.lora_params]
    first = FirstBatch()
    fit(module, steps=1, callbacks=[first])
    grad = torch.cat(
        [
            ((b - p.detach()) / LR).reshape(-1)
            for b, p in zip(before, module.lora_params, strict=True)
        ]
    )
    return grad, module, first.prompts


def test_sampler_timesteps_per_image_and_pairs(tiny_sd3_path):
    module = make_module(tiny_sd3_path, timesteps_per_image=0.5, num_inference_steps=4)
    module.configure_model()
    x0 = torch.randn(3, 16, 16, 16)
    pairs = module.training_pairs(x0)
    assert pairs.count == 2 and len(pairs) == 6
    sigmas = schedule_sigmas(module.policy.scheduler, 4, (16, 16, 16), module.policy.patch_size)
    assert sigmas[0] == 1.0 and float(sigmas.mean()) > 0.5  # shift 3 leans to high noise
    for i in range(3):
        t_i = pairs.t[pairs.image == i].tolist()
        assert len(set(t_i)) == 2 and set(t_i) <= set(sigmas.tolist())
    # Fresh noise per (image, t): v* = eps - x0 differs between an image's two pairs.
    assert not torch.equal(pairs.v_target[0], pairs.v_target[1])
    torch.testing.assert_close(
        pairs.x_t[0], (1 - pairs.t[0]) * x0[0] + pairs.t[0] * (pairs.v_target[0] + x0[0])
    )


@pytest.mark.parametrize("space", ["output", "parameters"])
def test_micro_batches_accumulate_into_the_one_batch_update(tiny_sd3_path, space):
    common = dict(gradient_space=space, timesteps_per_image=2, kl_beta=0.05)
    whole, m_whole, _ = one_step(tiny_sd3_path, **common)
    micro, m_micro, _ = one_step(tiny_sd3_path, micro_batch_size=5, **common)  # 12 pairs: 3 chunks
    assert whole.abs().max() > 0
    torch.testing.assert_close(micro, whole, rtol=1e-4, atol=1e-7)
    # The balance saw the whole batch either way: same Gram, same coefficients (to float32
    # summation order: the parameter-space gradients add up over micro-batches in float32).
    torch.testing.assert_close(m_micro.last_step.gram, m_whole.last_step.gram, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        torch.as_tensor(m_micro.last_step.weights), torch.as_tensor(m_whole.last_step.weights),
        rtol=1e-5, atol=1e-8,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("space", "balancer"),
    [
        ("output", "marble"),
        ("parameters", "marble"),
        ("output", "weighted_sum"),
        ("parameters", "single"),
    ],
)
def test_kl_gradient_is_autograd_of_the_kl_term(tiny_sd3_path, space, balancer):
    """The step's gradient with KL minus without is d(kl_beta * mean (v_theta - v_ref)^2)."""
    kl_beta = 0.5
    common = dict(
        gradient_space=space, balancer=balancer, timesteps_per_image=2, micro_batch_size=4
    )
    without, _, prompts = one_step(tiny_sd3_path, **common)
    with_kl, module, prompts_kl = one_step(tiny_sd3_path, kl_beta=kl_beta, **common)
    assert prompts == prompts_kl and prompts[0] in read_prompts(PROMPTS)

    ref = make_module(tiny_sd3_path, **common)  # the same initial state, step 0, outside a fit
    seeded_lora(ref)
    with torch.no_grad():
        out = ref.rollout_batch(prompts)
    pairs = ref.training_pairs(out.latents)
    embeds, pooled = out.prompt_embeds[pairs.image], out.pooled_prompt_embeds[pairs.image]
    v_theta = ref.velocity(pairs.x_t, pairs.t, embeds, pooled)
    with torch.no_grad(), use_adapter(ref.transformer, None):
        v_ref = ref.velocity(pairs.x_t, pairs.t, embeds, pooled)
    kl = kl_beta * (v_theta - v_ref).square().flatten(1).mean(1).mean()
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, ref.lora_params)])
    assert expected.abs().max() > 0
    torch.testing.assert_close(with_kl - without, expected, rtol=2e-3, atol=2e-6)
    assert module.last_step is not None


class Steps(Callback):
    """Each step's Gram, applied coefficients and the EMA's value after the step."""

    def __init__(self, ema: CoefficientEMA) -> None:
        self.ema, self.grams, self.applied, self.ema_after = ema, [], [], []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.grams.append(pl_module.last_step.gram.clone())
        self.applied.append(pl_module.last_step.weights.copy())
        self.ema_after.append(self.ema.value.copy())


def run_balance(path, lagged: bool, monkeypatch) -> tuple[Steps, list[int]]:
    module = make_module(path, timesteps_per_image=2, micro_batch_size=4, lagged_balance=lagged)
    seeded_lora(module)
    calls: list[int] = []
    velocity = module.velocity

    def counted(*args):
        calls.append(module.global_step)
        return velocity(*args)

    monkeypatch.setattr(module, "velocity", counted)
    ema = CoefficientEMA(decay=0.5, guard=False)
    steps = Steps(ema)
    fit(module, steps=2, callbacks=[ema, steps])
    return steps, calls


def test_lagged_balance_applies_earlier_coefficients_and_saves_the_extra_forward(
    tiny_sd3_path, monkeypatch
):
    exact, exact_calls = run_balance(tiny_sd3_path, False, monkeypatch)
    lagged, lagged_calls = run_balance(tiny_sd3_path, True, monkeypatch)
    # Step 0 is balanced exactly in both modes, so both reach step 1 in the same state: the
    # lagged step's Gram (from the update's own forwards) is the exact pre-pass's Gram.
    for g_lag, g_exact in zip(lagged.grams, exact.grams, strict=True):
        torch.testing.assert_close(g_lag, g_exact, rtol=1e-5, atol=0)
    np.testing.assert_allclose(lagged.applied[0], exact.applied[0], rtol=1e-9)
    # Step 1: lagged applies lambda_bar of step 0; exact applies lambda_bar with step 1 in it.
    np.testing.assert_allclose(lagged.applied[1], exact.ema_after[0], rtol=1e-9)
    assert not np.allclose(exact.applied[1], exact.ema_after[0])
    np.testing.assert_allclose(lagged.ema_after[1], exact.ema_after[1], rtol=1e-6)
    # Forwards per step (6 images x 2 timesteps in 3 micro-batches; rollouts: 3 steps x 6 x 2
    # adapters' calls are outside `velocity`): exact 3 per micro-batch, lagged 2 from step 1.
    per_step = [exact_calls.count(0), exact_calls.count(1), lagged_calls.count(1)]
    assert per_step == [9, 9, 6]


@pytest.mark.parametrize("noise_level", [0.0, 0.7], ids=["ode", "sde"])
def test_chunked_rollout_equals_one_call(tiny_sd3_path, noise_level):
    """Every sample's draws (initial and SDE step noise) come from its own generator."""
    module = make_module(tiny_sd3_path, noise_level=noise_level)
    module.configure_model()
    prompts = read_prompts(PROMPTS)[:5]
    whole = module.rollout_batch(prompts)
    module.hparams.rollout_chunk_size = 2
    chunked = module.rollout_batch(prompts)
    torch.testing.assert_close(chunked.latents, whole.latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.prompt_embeds, whole.prompt_embeds)


class Trained(Callback):
    """The trained adapter's LoRA tensors (by name) after every step."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after.append(
            {n: p.detach().clone() for n, p in pl_module.named_parameters() if ".default." in n}
        )


def test_evaluation_ema_adapter_follows_the_warmed_up_ema(tiny_sd3_path):
    module = make_module(tiny_sd3_path, eval_ema_decay=0.9)
    seeded_lora(module)
    assert module.eval_adapter == "ema"
    params = dict(module.named_parameters())
    ema = {n: p.detach().clone() for n, p in params.items() if ".default." in n}
    trained = Trained()
    fit(module, steps=2, callbacks=[trained])
    for step, theta in enumerate(trained.after, start=1):
        decay = min((1 + step) / (10 + step), 0.9)  # 2 / 11, then 3 / 12: DiffusionNFT's warm-up
        ema = {n: decay * e + (1 - decay) * theta[n] for n, e in ema.items()}
    assert ema and any(not torch.equal(ema[n], trained.after[-1][n]) for n in ema)
    for name, expected in ema.items():
        got = params[name.replace(".default.", ".ema.")]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_evaluation_sampler_steps(tiny_sd3_path):
    module = make_module(tiny_sd3_path, eval_num_inference_steps=5, noise_level=0.3)
    assert module.rollout_config.num_inference_steps == 3
    assert (
        module.eval_rollout_config.num_inference_steps,
        module.eval_rollout_config.noise_level,
    ) == (5, 0.0)
    module.configure_model()
    prompts = read_prompts(PROMPTS)[:2]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 16, 16, 16, generator=g)
    train = module.sample(prompts, g, noise=noise)
    evaluation = module.sample(prompts, g, noise=noise, config=module.eval_rollout_config)
    assert not torch.allclose(train.latents, evaluation.latents)
    with pytest.raises(ConfigError, match="eval_num_inference_steps"):
        make_module(tiny_sd3_path, eval_num_inference_steps=0)

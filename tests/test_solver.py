"""``model.solver: dpm2``: DiffusionNFT's second-order flow DPM-Solver (the official MARBLE
recipe's rollouts) against a hand-written reference of its formulas, its order of convergence,
and its use by rollouts, ``rollout_batch`` and ``marble fit``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_module import PROMPTS, make_module

from marble_pl.data import read_prompts
from marble_pl.errors import ConfigError
from marble_pl.rollout import RolloutConfig, sample_latents, schedule_sigmas
from marble_pl.solvers import dpm2_step, euler_step, first_order_coefficients

ROOT = Path(__file__).resolve().parents[1]
F32 = torch.finfo(torch.float32).eps


def shifted_sigmas(n: int, shift: float = 3.0) -> list[float]:
    """SD3's schedule: ``linspace(1, 1/n, n)`` shifted, then the final 0 (as float32 values)."""
    t = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t.float().tolist() + [0.0]


def reference_dpm2(velocity, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """DiffusionNFT's ``run_sampling(solver="dpm2", determistic=True)`` written out by hand from
    its formulas (flow_grpo/diffusers_patch/solver.py): DDIM on the first and the last step,
    multistep DPM-Solver++ 2 (lambda = log((1 - s) / s), float64 sigmas) in between."""
    s = torch.tensor(sigmas, dtype=torch.float32).to(torch.float64)
    steps = len(sigmas) - 1
    lam = torch.log(1 - s) - torch.log(s)  # -inf at s = 1, +inf at s = 0
    x0_prev = None
    for i in range(steps):
        x0 = x - s[i] * velocity(x, float(s[i]))
        if i == 0 or i == steps - 1:  # ddim_update(eta=0): (1 - t) x0 + t * eps_hat
            eps = (x - (1 - s[i]) * x0) / s[i]
            x_next = (1 - s[i + 1]) * x0 + s[i + 1] * eps
        else:
            h, h_0 = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
            d1 = (1.0 / (h_0 / h)) * (x0 - x0_prev)
            c = (1 - s[i + 1]) * (torch.exp(-h) - 1.0)
            x_next = (s[i + 1] / s[i]) * x - c * x0 - 0.5 * c * d1
        x, x0_prev = x_next.float(), x0
    return x


def run(step: str, velocity, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    x0_prev = None
    for i in range(len(sigmas) - 1):
        v = velocity(x, sigmas[i])
        if step == "euler":
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        else:
            x, x0_prev = dpm2_step(x, v, sigmas, i, x0_prev)
    return x


def toy_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A nonlinear field whose x0-prediction changes along the path (so D1 matters)."""
    return torch.sin(3 * x) * (1 + sigma) - 0.5 * x + sigma**2


@pytest.mark.parametrize("steps", [2, 3, 4, 10, 25])
def test_dpm2_matches_the_upstream_formulas(steps):
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = shifted_sigmas(steps)
    ours = run("dpm2", toy_velocity, x.clone(), sigmas)
    ref = reference_dpm2(toy_velocity, x.clone(), sigmas)
    assert ours.dtype == torch.float32
    # float32 states, float64 coefficients: a few float32 ulps per step
    torch.testing.assert_close(ours, ref, rtol=0, atol=50 * steps * F32 * float(ref.abs().max()))
    # D1 first acts on step 2 (step 1's h_0 is infinite, sigmas[0] = 1; the last step is first
    # order): up to 3 steps dpm2 IS Euler, upstream as here
    euler = run("euler", toy_velocity, x.clone(), sigmas)
    if steps >= 4:
        assert (ours - euler).abs().max() > 1e3 * steps * F32
    else:
        torch.testing.assert_close(ours, euler, rtol=0, atol=50 * steps * F32)


@pytest.mark.parametrize("steps", [4, 25])
def test_dpm2_is_diffusers_dpm_solver_update_on_the_same_sigmas(steps):
    """diffusers' DPMSolverMultistepScheduler (flow sigmas, dpmsolver++, order 2, lower-order
    final step) makes the same update when given the rollout's sigmas. Its ``set_timesteps``
    takes no custom sigmas and its own schedule differs (it starts at 0.9997, integer
    timesteps), hence the assignment and the pure function in the rollouts."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        solver_order=2,
        algorithm_type="dpmsolver++",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(steps)
    sigmas = shifted_sigmas(steps)
    assert sched.sigmas[0] < 1.0 and len(sched.sigmas) == len(sigmas)
    sched.sigmas = torch.tensor(sigmas)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = x.clone()
    for i, t in enumerate(sched.timesteps):
        theirs = sched.step(toy_velocity(theirs, sigmas[i]), t, theirs, return_dict=False)[0]
    ours = run("dpm2", toy_velocity, x, sigmas)
    torch.testing.assert_close(
        ours, theirs, rtol=0, atol=50 * steps * F32 * float(ours.abs().max())
    )


def test_first_order_step_is_euler_and_finite_at_the_ends():
    for sigma, nxt in ((1.0, 0.9), (0.9, 0.5), (0.2, 0.0)):
        c_x, c_0 = first_order_coefficients(sigma, nxt)
        # c_x x + c_0 (x - sigma v) = x + (nxt - sigma) v for every x, v
        assert math.isclose(c_x + c_0, 1.0, abs_tol=1e-15)
        assert math.isclose(-c_0 * sigma, nxt - sigma, abs_tol=1e-15)


def test_dpm2_is_second_order_and_euler_first_order():
    """``dx/ds = a x`` from s = 0.95 to 0.05 (exact ``x e^{a (s - 0.95)}``), in float64: the
    error falls ~4x when the steps double with dpm2, ~2x with Euler."""
    a, x1 = -1.0, torch.tensor([-1.5, 0.3, 2.0], dtype=torch.float64)
    exact = x1 * math.exp(a * (0.05 - 0.95))

    def errors(step: str) -> list[float]:
        out = []
        for n in (32, 64, 128):
            sigmas = torch.linspace(0.95, 0.05, n + 1, dtype=torch.float64).tolist()
            out.append(float((run(step, lambda x, s: a * x, x1, sigmas) - exact).abs().max()))
        return out

    dpm2, euler = errors("dpm2"), errors("euler")
    dpm2_ratios = [dpm2[k] / dpm2[k + 1] for k in range(2)]
    euler_ratios = [euler[k] / euler[k + 1] for k in range(2)]
    assert all(3.5 < r < 5.0 for r in dpm2_ratios), dpm2_ratios  # measured 4.38, 4.16
    assert all(1.8 < r < 2.2 for r in euler_ratios), euler_ratios  # measured 1.98, 1.99
    assert dpm2[-1] < euler[-1] / 50


def test_dpm2_step_checks_its_inputs():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="out of range"):
        dpm2_step(x, x, [1.0, 0.5, 0.0], 2, None)
    with pytest.raises(ValueError, match="x0_prev"):
        dpm2_step(x, x, [1.0, 0.5, 0.2, 0.0], 1, None)


def test_rollout_config_solver_is_checked():
    assert RolloutConfig().solver == "euler"
    with pytest.raises(ValueError, match="solver must be one of"):
        RolloutConfig(solver="heun")
    with pytest.raises(ValueError, match="noise_level 0"):
        RolloutConfig(solver="dpm2", noise_level=0.5)


# ----------------------------------------------------------------------- in the rollouts


def test_sample_latents_with_dpm2_is_the_reference_on_the_transformer(tiny_sd3_path):
    module = make_module(tiny_sd3_path, solver="dpm2", num_inference_steps=4)
    module.configure_model()
    assert module.rollout_config.solver == module.eval_rollout_config.solver == "dpm2"
    embeds, pooled = module.encode(read_prompts(PROMPTS)[:2])
    tr = module.transformer
    shape = module.rollout_config.latent_shape(tr, module.policy.vae_scale_factor)
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((x.shape[0],), sigma * 1000.0)  # the scheduler's timesteps
        return tr(
            hidden_states=x, timestep=t, encoder_hidden_states=embeds,
            pooled_projections=pooled, return_dict=False,
        )[0].float()  # fmt: skip

    dpm2 = module.rollout_config
    euler = replace(dpm2, solver="euler")
    kw = dict(noise=noise, latent_shape=shape)
    with torch.no_grad():
        got = sample_latents(tr, module.policy.scheduler, embeds, pooled, config=dpm2, **kw)
        euler = sample_latents(tr, module.policy.scheduler, embeds, pooled, config=euler, **kw)
        sigmas = schedule_sigmas(
            module.policy.scheduler, 4, shape, module.policy.patch_size
        ).tolist() + [0.0]
        ref = reference_dpm2(velocity, noise.clone(), sigmas)
    assert len(sigmas) == 5
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    assert (got - euler).abs().max() > 1e-3  # the solver option is used
    with torch.no_grad():  # deterministic
        again = sample_latents(tr, module.policy.scheduler, embeds, pooled, config=dpm2, **kw)
    assert torch.equal(got, again)


def test_rollout_batch_with_dpm2_does_not_depend_on_chunking(tiny_sd3_path):
    module = make_module(tiny_sd3_path, solver="dpm2", num_inference_steps=4)
    module.configure_model()
    prompts = read_prompts(PROMPTS)[:4]
    whole = module.rollout_batch(prompts)
    module.hparams.rollout_chunk_size = 1
    chunked = module.rollout_batch(prompts)
    torch.testing.assert_close(chunked.latents, whole.latents, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="model.solver"):
        make_module(tiny_sd3_path, solver="dpm2", noise_level=0.7)


@pytest.mark.slow
def test_marble_fit_with_dpm2(tmp_path, tiny_sd3_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--model.pretrained_model_name_or_path={tiny_sd3_path}",
        f"--data.train_file={ROOT / 'configs/prompts/tiny_train.txt'}",
        f"--data.val_file={ROOT / 'configs/prompts/tiny_val.txt'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--model.solver=dpm2",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "marble_pl.cli", "fit", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 1 and state["hyper_parameters"]["solver"] == "dpm2"

"""marble_pl.rollout: flow-matching sampling through the diffusers scheduler, CFG, SDE, decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from marble_pl.models import SD3Components, load_sd3
from marble_pl.rollout import RolloutConfig, decode_latents, rollout, sample_latents

SIZE = 32  # pixels; tiny VAE factor 2 -> 16x16 latents


@pytest.fixture(scope="module")
def parts(tiny_sd3_path: Path) -> SD3Components:
    return load_sd3(tiny_sd3_path, local_files_only=True)


@pytest.fixture(scope="module")
def cond(parts: SD3Components) -> dict[str, Tensor]:
    embeds, pooled = parts.encode_prompts(["a cat", "a dog", "a tree"], max_sequence_length=8)
    neg, neg_pooled = parts.encode_prompts([""], max_sequence_length=8)
    return {"embeds": embeds, "pooled": pooled, "neg": neg, "neg_pooled": neg_pooled}


def config(**overrides) -> RolloutConfig:
    values = dict(num_inference_steps=3, guidance_scale=1.0, height=SIZE, width=SIZE)
    values.update(overrides)
    return RolloutConfig(**values)


def run(parts: SD3Components, cond: dict[str, Tensor], cfg: RolloutConfig, seed: int = 0):
    return rollout(
        parts.transformer,
        parts.vae,
        parts.scheduler,
        cond["embeds"],
        cond["pooled"],
        config=cfg,
        negative_prompt_embeds=cond["neg"],
        negative_pooled_prompt_embeds=cond["neg_pooled"],
        generator=torch.Generator().manual_seed(seed),
    )


def test_rollout_shapes_and_image_range(parts: SD3Components, cond: dict[str, Tensor]) -> None:
    out = run(parts, cond, config())
    assert out.latents.shape == (3, 16, SIZE // 2, SIZE // 2)
    assert out.images.shape == (3, 3, SIZE, SIZE)
    assert out.latents.dtype == torch.float32 and out.images.dtype == torch.float32
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert torch.isfinite(out.latents).all()
    assert out.prompt_embeds is cond["embeds"] and out.pooled_prompt_embeds is cond["pooled"]


def test_rollout_is_deterministic_per_seed(parts: SD3Components, cond: dict[str, Tensor]) -> None:
    a, b, c = (run(parts, cond, config(), seed=s) for s in (7, 7, 8))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    assert not torch.allclose(a.latents, c.latents)


def test_caller_scheduler_is_not_mutated(parts: SD3Components, cond: dict[str, Tensor]) -> None:
    before = parts.scheduler.timesteps.clone()
    run(parts, cond, config(num_inference_steps=2))
    assert parts.scheduler.step_index is None
    assert torch.equal(parts.scheduler.timesteps, before)


def test_cfg_runs_and_changes_the_result(parts: SD3Components, cond: dict[str, Tensor]) -> None:
    plain = run(parts, cond, config())
    guided = run(parts, cond, config(guidance_scale=4.5))
    assert guided.latents.shape == plain.latents.shape
    assert torch.isfinite(guided.latents).all()
    assert not torch.allclose(guided.latents, plain.latents)
    # a batch-1 negative broadcasts exactly like an explicit batch-N one
    n = cond["embeds"].shape[0]
    explicit = dict(
        cond, neg=cond["neg"].repeat(n, 1, 1), neg_pooled=cond["neg_pooled"].repeat(n, 1)
    )
    torch.testing.assert_close(
        run(parts, explicit, config(guidance_scale=4.5)).latents, guided.latents
    )


def test_cfg_without_negatives_is_a_clear_error(
    parts: SD3Components, cond: dict[str, Tensor]
) -> None:
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        sample_latents(
            parts.transformer,
            parts.scheduler,
            cond["embeds"],
            cond["pooled"],
            config=config(guidance_scale=3.0),
            latent_shape=(16, 16, 16),
        )


def test_sde_runs_differs_from_ode_and_is_seeded(
    parts: SD3Components, cond: dict[str, Tensor]
) -> None:
    ode = run(parts, cond, config(), seed=1)
    sde_a = run(parts, cond, config(noise_level=0.7), seed=1)
    sde_b = run(parts, cond, config(noise_level=0.7), seed=1)
    assert torch.isfinite(sde_a.latents).all()
    assert not torch.allclose(sde_a.latents, ode.latents)
    assert torch.equal(sde_a.latents, sde_b.latents)


def test_one_step_is_the_analytic_euler_step(parts: SD3Components, cond: dict[str, Tensor]) -> None:
    shape = (16, 8, 8)
    x0 = sample_latents(
        parts.transformer,
        parts.scheduler,
        cond["embeds"],
        cond["pooled"],
        config=config(num_inference_steps=1),
        generator=torch.Generator().manual_seed(3),
        latent_shape=shape,
    )
    n = cond["embeds"].shape[0]
    x1 = randn_tensor((n, *shape), generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    with torch.no_grad():
        v = parts.transformer(
            hidden_states=x1,
            timestep=torch.full((n,), 1000.0),  # sigma = 1 (pure noise) in scheduler units
            encoder_hidden_states=cond["embeds"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]
    torch.testing.assert_close(x0, x1 - v)


def test_decode_unscales_like_the_sd3_pipeline(parts: SD3Components) -> None:
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    images = decode_latents(parts.vae, latents)
    vae = parts.vae
    with torch.no_grad():
        raw = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))
    assert images.shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"height": 0}, "height"),
        ({"width": 12.5}, "width"),
        ({"noise_level": -0.1}, "noise_level"),
        ({"noise_level": float("nan")}, "noise_level"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RolloutConfig(**overrides)


def test_sizes_are_checked_against_the_model(parts: SD3Components) -> None:
    with pytest.raises(ValueError, match="divisible by vae_scale_factor"):
        config(height=30).latent_shape(parts.transformer, vae_scale_factor=2)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        config(height=512, width=512).latent_shape(parts.transformer, vae_scale_factor=2)
    assert config(height=48, width=32).latent_shape(parts.transformer, 2) == (16, 24, 16)

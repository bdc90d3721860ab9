"""Flow-matching rollouts for SD3: batched sampling with a diffusers scheduler, CFG, VAE decode.

Conventions (as SD3 / diffusers): ``x_t = (1 - t) x0 + t eps``, velocity ``v = eps - x0``; the
transformer takes ``timestep = sigma * 1000`` (the scheduler's timesteps) and latents in the
scaled latent space (before the VAE's ``/ scaling_factor + shift_factor``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from marble_pl.solvers import SOLVERS, dpm2_step

__all__ = ["RolloutConfig", "RolloutOutput", "decode_latents", "rollout", "sample_latents"]

Generators = torch.Generator | list[torch.Generator] | None
"""One generator for the batch, or one per sample (draws then independent of the batching)."""

SD3_VAE_SCALE_FACTOR = 8


@dataclass
class RolloutConfig:
    """How rollouts are sampled.

    ``noise_level == 0`` runs the deterministic probability-flow ODE with the scheduler's Euler
    ``step``. ``noise_level = a > 0`` runs the Flow-GRPO / DiffusionNFT SDE (Euler-Maruyama),
    from sigma ``s`` to ``s' < s`` (``dt = s' - s < 0``), with ``std = a * sqrt(s / (1 - s))``
    (``s = 1`` replaced by the second sigma to stay finite)::

        x' = x * (1 + std^2 / (2 s) * dt) + v * (1 + std^2 * (1 - s) / (2 s)) * dt
             + std * sqrt(-dt) * z,   z ~ N(0, I)

    which has the same marginals as the ODE for any ``a``.

    ``solver`` picks the deterministic ODE step: ``euler`` (the scheduler's ``step``) or
    ``dpm2``, DiffusionNFT's second-order multistep DPM-Solver++ on the same sigmas
    (:func:`marble_pl.solvers.dpm2_step`; ``noise_level`` must then be 0, as upstream).
    """

    num_inference_steps: int = 10
    guidance_scale: float = 4.5
    height: int = 512
    width: int = 512
    noise_level: float = 0.0
    solver: str = "euler"

    def __post_init__(self) -> None:
        """Validate the values early, naming the field and the fix."""
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps must be an int >= 1, got {self.num_inference_steps!r}."
            )
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(
                "guidance_scale must be finite and >= 0 (<= 1 disables CFG), "
                f"got {self.guidance_scale!r}."
            )
        for field in ("height", "width"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int (pixels), got {value!r}.")
        if not math.isfinite(self.noise_level) or self.noise_level < 0:
            raise ValueError(
                "noise_level must be finite and >= 0 (0 = deterministic ODE), "
                f"got {self.noise_level!r}."
            )
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {list(SOLVERS)}, got {self.solver!r}.")
        if self.solver != "euler" and self.noise_level > 0:
            raise ValueError(
                f"solver {self.solver!r} is deterministic: it needs noise_level 0, got "
                f"{self.noise_level!r} (use solver 'euler' for the SDE)."
            )

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance is on when guidance_scale > 1, as in the SD3 pipeline."""
        return self.guidance_scale > 1.0

    def latent_shape(self, transformer: nn.Module, vae_scale_factor: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents for this image size, checked against the transformer."""
        cfg = transformer.config
        multiple = vae_scale_factor * cfg.patch_size
        if self.height % multiple or self.width % multiple:
            h = max(multiple, self.height - self.height % multiple)
            w = max(multiple, self.width - self.width % multiple)
            raise ValueError(
                f"height and width must be divisible by vae_scale_factor * patch_size = "
                f"{multiple}, got {self.height}x{self.width}; use e.g. {h}x{w}."
            )
        shape = (cfg.in_channels, self.height // vae_scale_factor, self.width // vae_scale_factor)
        _check_latent_shape(transformer, shape)
        return shape


@dataclass
class RolloutOutput:
    """Clean latents, decoded images in [0, 1] and the conditioning they were sampled with."""

    latents: Tensor
    images: Tensor
    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor


def _check_latent_shape(transformer: nn.Module, shape: tuple[int, int, int]) -> None:
    """Fail early when latents do not fit the transformer (channels, patching, position table)."""
    cfg = transformer.config
    channels, h, w = shape
    if channels != cfg.in_channels:
        raise ValueError(
            f"latent channels {channels} != transformer in_channels {cfg.in_channels}."
        )
    if h % cfg.patch_size or w % cfg.patch_size:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch_size {cfg.patch_size}.")
    max_size = getattr(cfg, "pos_embed_max_size", None)
    if max_size is not None and max(h, w) // cfg.patch_size > max_size:
        raise ValueError(
            f"latent size {h}x{w} needs {max(h, w) // cfg.patch_size} patches per side, more "
            f"than the transformer's pos_embed_max_size {max_size}; use a smaller height/width."
        )


def _expand_batch(x: Tensor, n: int, what: str) -> Tensor:
    """Broadcast a batch-1 tensor to ``n`` rows; anything but 1 or ``n`` rows is an error."""
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    raise ValueError(f"{what} has batch {x.shape[0]}, expected 1 or {n} (the prompt batch).")


def _set_timesteps(
    scheduler: object, num_steps: int, image_seq_len: int, device: torch.device
) -> None:
    """``scheduler.set_timesteps``, passing ``mu`` when the config uses dynamic shifting."""
    cfg = scheduler.config
    if getattr(cfg, "use_dynamic_shifting", False):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.16),
        )
        scheduler.set_timesteps(num_steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(num_steps, device=device)


def schedule_sigmas(
    scheduler: object, num_steps: int, latent_shape: tuple[int, int, int], patch_size: int
) -> Tensor:
    """The sampler's ``num_steps`` timesteps ``t`` in (0, 1] (its sigmas without the final 0),
    shifted exactly as a rollout of ``latent_shape`` latents shifts them; on the CPU."""
    sched = copy.deepcopy(scheduler)
    seq_len = (latent_shape[1] // patch_size) * (latent_shape[2] // patch_size)
    _set_timesteps(sched, num_steps, seq_len, torch.device("cpu"))
    return sched.sigmas[:num_steps].to(dtype=torch.float32, device="cpu")


def _sde_step(
    v: Tensor,
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    sigma_max: Tensor,
    noise_level: float,
    generator: Generators,
) -> Tensor:
    """One Euler-Maruyama step of the Flow-GRPO SDE (formula in :class:`RolloutConfig`)."""
    dt = sigma_next - sigma
    std = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + std * torch.sqrt(-dt) * z


@torch.no_grad()
def sample_latents(
    transformer: nn.Module,
    scheduler: object,
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor,
    *,
    config: RolloutConfig,
    negative_prompt_embeds: Tensor | None = None,
    negative_pooled_prompt_embeds: Tensor | None = None,
    generator: Generators = None,
    latent_shape: tuple[int, int, int] | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Sample clean latents ``x0 [N, C, h, w]`` (float32) from pure noise with the scheduler.

    CFG (``guidance_scale > 1``) batches the negative and positive passes in one forward and needs
    negative embeddings (batch 1 or N). ``latent_shape`` defaults to SD3's VAE factor 8 applied to
    ``config.height``/``width``. The caller's scheduler is not mutated (a deep copy steps).
    ``noise`` (``[N, *latent_shape]``) replaces the initial Gaussian draw, so callers can make
    each sample's noise depend on its own seed (results independent of batching / world size);
    a LIST of N generators does the same for the SDE's per-step noise (each sample draws from its
    own, as diffusers' ``randn_tensor`` does with a list).
    """
    n = prompt_embeds.shape[0]
    if pooled_prompt_embeds.shape[0] != n:
        raise ValueError(
            f"pooled_prompt_embeds has batch {pooled_prompt_embeds.shape[0]}, prompt_embeds {n}."
        )
    if latent_shape is None:
        latent_shape = config.latent_shape(transformer, SD3_VAE_SCALE_FACTOR)
    latent_shape = tuple(int(s) for s in latent_shape)
    _check_latent_shape(transformer, latent_shape)
    device, dtype = prompt_embeds.device, transformer.dtype

    embeds, pooled = prompt_embeds.to(dtype), pooled_prompt_embeds.to(dtype)
    if config.do_cfg:
        if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
            raise ValueError(
                f"guidance_scale={config.guidance_scale} > 1 needs negative_prompt_embeds and "
                "negative_pooled_prompt_embeds (encode [''] with encode_prompts), or set "
                "guidance_scale <= 1."
            )
        neg = _expand_batch(negative_prompt_embeds, n, "negative_prompt_embeds").to(device, dtype)
        neg_pooled = _expand_batch(
            negative_pooled_prompt_embeds, n, "negative_pooled_prompt_embeds"
        )
        embeds = torch.cat([neg, embeds])
        pooled = torch.cat([neg_pooled.to(device, dtype), pooled])

    sched = copy.deepcopy(scheduler)
    patch = transformer.config.patch_size
    _set_timesteps(
        sched,
        config.num_inference_steps,
        (latent_shape[1] // patch) * (latent_shape[2] // patch),
        device,
    )
    sigmas = sched.sigmas.to(device=device, dtype=torch.float32)
    schedule = sched.sigmas.float().tolist()  # dpm2's float64 coefficients come from these
    x0_prev = None

    if noise is not None:
        if tuple(noise.shape) != (n, *latent_shape):
            raise ValueError(
                f"noise must have shape {(n, *latent_shape)}, got {tuple(noise.shape)}"
            )
        latents = noise.to(device=device, dtype=torch.float32)
    else:
        latents = randn_tensor(
            (n, *latent_shape), generator=generator, device=device, dtype=torch.float32
        )
    for i, t in enumerate(sched.timesteps):
        model_in = torch.cat([latents, latents]) if config.do_cfg else latents
        v = transformer(
            hidden_states=model_in.to(dtype),
            timestep=t.expand(model_in.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0].float()
        if config.do_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + config.guidance_scale * (v_cond - v_uncond)
        if config.noise_level > 0:
            latents = _sde_step(
                v, latents, sigmas[i], sigmas[i + 1], sigmas[1], config.noise_level, generator
            )
        elif config.solver == "dpm2":
            latents, x0_prev = dpm2_step(latents, v, schedule, i, x0_prev)
        else:
            one = generator if isinstance(generator, torch.Generator) else None
            latents = sched.step(v, t, latents, generator=one, return_dict=False)[0]
    return latents.float()


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Decode transformer-space latents to float32 images ``[N, 3, H, W]`` in [0, 1].

    Un-scales as the SD3 pipeline does: ``latents / scaling_factor + shift_factor``.
    """
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    scaled = latents / cfg.scaling_factor + shift
    image = vae.decode(scaled.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
    return VaeImageProcessor.denormalize(image.float())


def rollout(
    transformer: nn.Module,
    vae: nn.Module,
    scheduler: object,
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor,
    *,
    config: RolloutConfig,
    negative_prompt_embeds: Tensor | None = None,
    negative_pooled_prompt_embeds: Tensor | None = None,
    generator: Generators = None,
    noise: Tensor | None = None,
) -> RolloutOutput:
    """Sample latents at ``config.height x config.width`` and decode them (no grad)."""
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = sample_latents(
        transformer,
        scheduler,
        prompt_embeds,
        pooled_prompt_embeds,
        config=config,
        negative_prompt_embeds=negative_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        generator=generator,
        latent_shape=config.latent_shape(transformer, vae_scale_factor),
        noise=noise,
    )
    images = decode_latents(vae, latents)
    return RolloutOutput(
        latents=latents,
        images=images,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
    )

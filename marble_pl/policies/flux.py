"""FLUX.1 (``FluxPipeline``): the second model family.

``FluxTransformer2DModel`` carries the LoRA adapters. CLIP-L gives the pooled vector, T5-XXL the
token sequence (``txt_ids`` all zero); the transformer sees the VAE's 16-channel latents packed
in 2x2 patches (64 channels per token, ``img_ids`` = (0, row, column)) and FLUX.1-dev's distilled
guidance as an input embedding (not classifier-free guidance: one forward per step). The
algorithm's latents stay unpacked, ``[C, h, w]``, so ``x_t = (1 - t) x0 + t eps`` and the noise
draws are the pipeline's own; packing is a permutation, done inside :meth:`FluxPolicy.velocity`.
The sampler is ``FluxPipeline``'s: sigmas ``linspace(1, 1/n, n)`` shifted by ``mu`` from the
image's token count (dynamic shifting).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from marble_pl.checks import check_resolution
from marble_pl.errors import ConfigError
from marble_pl.flux.architecture import shipped_flux_configs
from marble_pl.flux.components import (
    FluxComponents,
    build_random_flux,
    flux_configs,
    load_flux,
)
from marble_pl.flux.tiny import ensure_tiny_flux
from marble_pl.models import TORCH_DTYPES, ModelLoadError, looks_like_local_path
from marble_pl.policies.base import Conditioning, Policy, register_policy
from marble_pl.rollout import RolloutConfig, RolloutOutput, _sde_step, decode_latents
from marble_pl.solvers import dpm2_step

__all__ = ["DISTILLED_GUIDANCE", "FluxPolicy", "flux_sigmas", "pack_latents", "unpack_latents"]

DISTILLED_GUIDANCE = 3.5
"""FLUX.1-dev's guidance embedding value: ``FluxPipeline``'s default and Flow-GRPO's FLUX
recipes' ``guidance_scale``; ``model.distilled_guidance`` when set."""

PACKING = 2
"""Latent cells per token side: FLUX packs 2x2 cells into one token of 4 x 16 channels."""


def pack_latents(latents: Tensor) -> Tensor:
    """``[N, C, h, w]`` -> ``[N, h/2 * w/2, 4C]``: 2x2 patches as tokens, as ``FluxPipeline``."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents` for ``h x w`` latents."""
    n, _, d = tokens.shape
    x = tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[h/2 * w/2, 3]`` positions ``(0, row, column)`` of the packed tokens (rotary axes)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_shift(scheduler: object, image_seq_len: int) -> float:
    """``mu``: linear in the image's token count, from ``base_shift`` at ``base_image_seq_len``
    to ``max_shift`` at ``max_image_seq_len`` (FLUX's dynamic shifting)."""
    cfg = scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + base - slope * base_len


def _stepping(scheduler: object, num_steps: int, image_seq_len: int, device: torch.device):
    """A copy of the scheduler set to ``FluxPipeline``'s ``num_steps`` timesteps."""
    sched = copy.deepcopy(scheduler)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if getattr(sched.config, "use_dynamic_shifting", False):
        mu = flux_shift(sched, image_seq_len)
        sched.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    else:
        sched.set_timesteps(sigmas=sigmas, device=device)
    return sched


def flux_sigmas(scheduler: object, num_steps: int, latent_shape: tuple[int, ...]) -> Tensor:
    """The sampler's ``num_steps`` shifted sigmas (no final 0) for ``[C, h, w]`` latents, CPU."""
    seq_len = (latent_shape[1] // 2) * (latent_shape[2] // 2)
    sched = _stepping(scheduler, num_steps, seq_len, torch.device("cpu"))
    return sched.sigmas[:num_steps].to(dtype=torch.float32, device="cpu")


@register_policy("FluxPipeline")
class FluxPolicy(Policy):
    """FLUX's transformer with its LoRA adapters, CLIP + T5, the VAE and the flow sampler."""

    name = "flux"
    module_names = ("transformer", "vae", "text_encoder", "text_encoder_2")
    """The transformer, the VAE, CLIP and T5."""
    default_distilled_guidance = DISTILLED_GUIDANCE
    components: FluxComponents

    @classmethod
    def claims(cls, name: str) -> bool:
        """A shipped FLUX hub id, or a path still to be built whose last part names FLUX (a
        guess for ``model.family: null``; the FLUX configs set ``model.family: flux``)."""
        return shipped_flux_configs(name) is not None or "flux" in Path(name).name.lower()

    @property
    def distilled_guidance(self) -> float:
        """The guidance embedding's value (the module's ``distilled_guidance``, else 3.5)."""
        value = self.hparams.get("distilled_guidance", None)
        return DISTILLED_GUIDANCE if value is None else float(value)

    def resolution_sizes(self) -> tuple[int, int, int] | None:
        """``(2 x vae_scale_factor, vae_scale_factor, 2)``: images are 2x2 patches of latents."""
        hp = self.hparams
        path = hp["pretrained_model_name_or_path"]
        try:
            if hp["random_weights"] or not looks_like_local_path(path):
                configs, _ = flux_configs(path)
                vae = configs["vae"]
            else:
                vae = json.loads((Path(path) / "vae" / "config.json").read_text())
            factor = 2 ** (len(vae["block_out_channels"]) - 1)
        except (ModelLoadError, OSError, KeyError, TypeError, ValueError):
            return None
        return PACKING * factor, factor, PACKING

    def build_tiny(self, path: str) -> None:
        """The tiny random FLUX of ``configs/tiny_flux.yaml`` at ``path`` (atomic)."""
        ensure_tiny_flux(path)

    def load(self) -> None:
        """Load the FLUX components (or build them at random), freeze them, attach the LoRA."""
        hp = self.hparams
        if not hp.get("load_t5", True):
            raise ConfigError(
                "model.load_t5: false, but FLUX reads its prompt from T5 (text_encoder_2) and "
                "cannot run without it; set model.load_t5: true"
            )
        path = hp["pretrained_model_name_or_path"]
        dtype = TORCH_DTYPES[hp["weights_dtype"]]
        if hp["random_weights"]:
            parts = build_random_flux(
                path,
                dtype=dtype,
                architecture_overrides=hp["architecture_overrides"],
                seed=hp["seed"],
            ).components
        else:
            parts = load_flux(path, local_files_only=hp["local_files_only"], dtype=dtype)
        self.components = parts
        self.transformer = parts.transformer
        self.vae = parts.vae
        self.text_encoder = parts.text_encoder
        self.text_encoder_2 = parts.text_encoder_2
        self.scheduler = parts.scheduler
        if hp.get("distilled_guidance") is not None and not self.transformer.config.guidance_embeds:
            raise ConfigError(
                f"model.distilled_guidance is {hp['distilled_guidance']} but this FLUX "
                "transformer has no guidance embedding (guidance_embeds: false, e.g. "
                "FLUX.1-schnell): set model.distilled_guidance: null"
            )
        self.prepare_training()
        self.vae_scale_factor = parts.vae_scale_factor
        self.patch_size = PACKING  # a token is a 2x2 patch of latent cells, as SD3's patches
        check_resolution(
            hp["resolution"], PACKING * self.vae_scale_factor, self.vae_scale_factor, PACKING
        )

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """``(T5 sequence, CLIP pooled)`` of the prompts (no negative prompt: FLUX-dev has no
        CFG); ``txt_ids`` are zeros, rebuilt from the sequence length where needed."""
        embeds, pooled, _ = self.components.encode_prompts(
            list(prompts),
            device=self.device,
            max_sequence_length=self.hparams["max_sequence_length"],
        )
        return embeds, pooled

    def _forward(self, latents: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        """``v`` in float32, ``[N, C, h, w]``, for unpacked latents at ``t`` in [0, 1]."""
        transformer = self.transformer
        dtype, device = transformer.dtype, latents.device
        n, _, h, w = latents.shape
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.distilled_guidance, device=device, dtype=torch.float32)
        v = transformer(
            hidden_states=pack_latents(latents).to(dtype),
            timestep=t.to(device=device, dtype=torch.float32).expand(n),
            guidance=guidance,
            pooled_projections=pooled.to(device=device, dtype=dtype),
            encoder_hidden_states=embeds.to(device=device, dtype=dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids(h, w, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(v.float(), h, w)

    def velocity(self, x_t: Tensor, t: Tensor, *cond: Tensor) -> Tensor:
        """``v(x_t, t)`` in float32 with whichever adapter is active (``t`` in [0, 1])."""
        embeds, pooled = cond
        return self._forward(x_t, t, embeds, pooled)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        generator: torch.Generator | list[torch.Generator],
        adapter: str | None,
        noise: Tensor | None,
        config: RolloutConfig,
    ) -> RolloutOutput:
        """Roll out one image per prompt with ``adapter``: ``FluxPipeline``'s sampler (Euler,
        or the SDE / ``dpm2`` of :class:`~marble_pl.rollout.RolloutConfig`), VAE-decoded."""
        embeds, pooled = self.encode(prompts)
        shape = self.latent_shape(config)
        n, device = len(prompts), self.device
        if noise is not None:
            if tuple(noise.shape) != (n, *shape):
                raise ValueError(f"noise must have shape {(n, *shape)}, got {tuple(noise.shape)}")
            latents = noise.to(device=device, dtype=torch.float32)
        else:
            latents = randn_tensor((n, *shape), generator=generator, device=device)
            latents = latents.float()
        sched = _stepping(
            self.scheduler, config.num_inference_steps, (shape[1] // 2) * (shape[2] // 2), device
        )
        sigmas = sched.sigmas.to(device=device, dtype=torch.float32)
        schedule = sched.sigmas.float().tolist()
        x0_prev = None
        with self.use_adapter(adapter):
            for i, t in enumerate(sched.timesteps):
                v = self._forward(latents, t / 1000, embeds, pooled)
                if config.noise_level > 0:
                    latents = _sde_step(
                        v, latents, sigmas[i], sigmas[i + 1], sigmas[1], config.noise_level,
                        generator,
                    )  # fmt: skip
                elif config.solver == "dpm2":
                    latents, x0_prev = dpm2_step(latents, v, schedule, i, x0_prev)
                else:
                    latents = sched.step(v, t, latents, return_dict=False)[0]
        images = decode_latents(self.vae, latents)
        return RolloutOutput(
            latents=latents, images=images, prompt_embeds=embeds, pooled_prompt_embeds=pooled
        )

    def latent_shape(self, config: RolloutConfig) -> tuple[int, ...]:
        """``(C, h, w)`` of one image's latents: whole 2x2 patches of VAE cells."""
        cell = 2 * self.vae_scale_factor
        if config.height % cell or config.width % cell:
            raise ValueError(
                f"FLUX images must be multiples of {cell} px (VAE factor {self.vae_scale_factor} "
                f"x 2x2 packing), got {config.height}x{config.width}."
            )
        channels = int(self.vae.config.latent_channels)
        return (
            channels,
            config.height // self.vae_scale_factor,
            config.width // self.vae_scale_factor,
        )

    def schedule_sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> Tensor:
        """``FluxPipeline``'s shifted sigmas for ``latent_shape`` latents (without the final 0)."""
        return flux_sigmas(self.scheduler, num_steps, tuple(latent_shape))

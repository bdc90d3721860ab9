"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): the first model family.

The MMDiT denoiser (``SD3Transformer2DModel``) carries the LoRA adapters; two CLIP encoders and
an optional T5 give ``(prompt_embeds, pooled)``; the flow-matching Euler scheduler's shifted
sigmas are the rollout's and the training timesteps' schedule (:mod:`marble_pl.rollout`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from marble_pl.checks import check_resolution, resolution_multiple
from marble_pl.models import TORCH_DTYPES, encode_prompts, ensure_tiny_sd3, load_sd3
from marble_pl.policies.base import Conditioning, Policy, register_policy
from marble_pl.random_weights import build_random_sd3, random_weights_resolution_multiple
from marble_pl.rollout import RolloutConfig, RolloutOutput, rollout, schedule_sigmas

__all__ = ["SD3Policy"]


@register_policy("StableDiffusion3Pipeline")
class SD3Policy(Policy):
    """SD3's transformer with its LoRA adapters, three text encoders, VAE and scheduler."""

    name = "sd3"
    module_names = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    """The transformer, the VAE and the three text encoders (T5 None when not loaded)."""

    def __init__(self, hparams) -> None:
        super().__init__(hparams)
        self._negative: tuple[Tensor, Tensor] | None = None

    def resolution_sizes(self) -> tuple[int, int, int] | None:
        """``(multiple, vae_scale_factor, patch_size)`` from the transformer's and VAE's configs."""
        hp = self.hparams
        path = hp["pretrained_model_name_or_path"]
        if hp["random_weights"]:
            return random_weights_resolution_multiple(path, hp["architecture_overrides"])
        return resolution_multiple(path, local_files_only=hp["local_files_only"])

    def build_tiny(self, path: str) -> None:
        """The tiny random SD3 pipeline of ``configs/tiny.yaml`` at ``path`` (atomic)."""
        ensure_tiny_sd3(path)

    def load(self) -> None:
        """Load the SD3 components (or build them at random), freeze them, attach the LoRA."""
        hp = self.hparams
        path = hp["pretrained_model_name_or_path"]
        dtype = TORCH_DTYPES[hp["weights_dtype"]]
        if hp["random_weights"]:
            parts = build_random_sd3(
                path,
                dtype=dtype,
                load_t5=hp["load_t5"],
                architecture_overrides=hp["architecture_overrides"],
                seed=hp["seed"],
            ).components
        else:
            parts = load_sd3(
                path, local_files_only=hp["local_files_only"], load_t5=hp["load_t5"], dtype=dtype
            )
        self.transformer = parts.transformer
        self.vae = parts.vae
        self.text_encoder = parts.text_encoder
        self.text_encoder_2 = parts.text_encoder_2
        self.text_encoder_3 = parts.text_encoder_3
        self.tokenizers = (parts.tokenizer, parts.tokenizer_2, parts.tokenizer_3)
        self.scheduler = parts.scheduler
        self.prepare_training()
        self.patch_size = int(self.transformer.config.patch_size)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        multiple = self.vae_scale_factor * self.patch_size
        check_resolution(hp["resolution"], multiple, self.vae_scale_factor, self.patch_size)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Text conditioning ``(prompt_embeds, pooled)`` from the frozen encoders."""
        tok, tok2, tok3 = self.tokenizers
        return encode_prompts(
            list(prompts),
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer=tok,
            tokenizer_2=tok2,
            tokenizer_3=tok3,
            transformer=self.transformer,
            device=self.device,
            max_sequence_length=self.hparams["max_sequence_length"],
        )

    def negative_embeds(self, n: int, config: RolloutConfig) -> tuple[Tensor | None, Tensor | None]:
        """Empty-prompt conditioning for CFG, encoded once and cached (None without CFG)."""
        if config.guidance_scale <= 1.0:
            return None, None
        if self._negative is None or self._negative[0].device != self.device:
            self._negative = self.encode([""])
        neg, neg_pooled = self._negative
        return neg.expand(n, *neg.shape[1:]), neg_pooled.expand(n, *neg_pooled.shape[1:])

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        generator: torch.Generator | list[torch.Generator],
        adapter: str | None,
        noise: Tensor | None,
        config: RolloutConfig,
    ) -> RolloutOutput:
        """Roll out one image per prompt with ``adapter`` and ``config``'s sampler settings."""
        embeds, pooled = self.encode(prompts)
        neg, neg_pooled = self.negative_embeds(len(prompts), config)
        with self.use_adapter(adapter):
            return rollout(
                self.transformer,
                self.vae,
                self.scheduler,
                embeds,
                pooled,
                config=config,
                negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=neg_pooled,
                generator=generator,
                noise=noise,
            )

    def velocity(self, x_t: Tensor, t: Tensor, *cond: Tensor) -> Tensor:
        """``v(x_t, t)`` in float32 from the transformer with whichever adapter is active."""
        embeds, pooled = cond
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=x_t.to(dtype),
            timestep=t * self.scheduler.config.num_train_timesteps,
            encoder_hidden_states=embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            return_dict=False,
        )[0].float()

    def latent_shape(self, config: RolloutConfig) -> tuple[int, ...]:
        """``(C, h, w)`` of one image's latents at ``config``'s resolution."""
        return config.latent_shape(self.transformer, self.vae_scale_factor)

    def schedule_sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> Tensor:
        """The scheduler's shifted sigmas for ``latent_shape`` latents (without the final 0)."""
        return schedule_sigmas(self.scheduler, num_steps, tuple(latent_shape), self.patch_size)

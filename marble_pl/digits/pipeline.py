"""The digits pipeline's components: real diffusers/transformers classes at a CPU-trainable size.

A one-level AutoencoderKL (vae_scale_factor 1, 4 latent channels: 16x16 images, 16x16 latents),
an SD3Transformer2DModel (patch 2, 64 image tokens) and the tiny SD3's two CLIP text encoders,
whose tokenizers pad to :data:`TOKENS` instead of 77 (the prompts are short).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from marble_pl.digits.data import IMAGE_SIZE
from marble_pl.models import TINY_JOINT_DIM, TINY_POOLED_DIM, tiny_sd3_pipeline

__all__ = ["LATENT_CHANNELS", "T5_TOKENS", "TOKENS", "DigitsArch", "digits_pipeline"]

LATENT_CHANNELS = 4
TOKENS = 40  # CLIP tokens per prompt: "a handwritten digit, thick strokes" is 36 with specials
T5_TOKENS = 8  # the zero T5 stream's length: `model.max_sequence_length` of configs/digits.yaml


@dataclass(frozen=True)
class DigitsArch:
    """Sizes of the digits transformer and VAE."""

    layers: int = 4
    heads: int = 4
    head_dim: int = 16
    vae_channels: int = 16


def digits_pipeline(arch: DigitsArch, *, seed: int = 0) -> StableDiffusion3Pipeline:
    """A randomly initialised digits pipeline (deterministic given ``seed``; global RNG untouched)."""
    text = tiny_sd3_pipeline(seed=seed)
    for tokenizer in (text.tokenizer, text.tokenizer_2):
        tokenizer.model_max_length = TOKENS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        width = arch.heads * arch.head_dim
        transformer = SD3Transformer2DModel(
            sample_size=IMAGE_SIZE,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=arch.layers,
            attention_head_dim=arch.head_dim,
            num_attention_heads=arch.heads,
            joint_attention_dim=TINY_JOINT_DIM,
            caption_projection_dim=width,
            pooled_projection_dim=TINY_POOLED_DIM,
            pos_embed_max_size=IMAGE_SIZE // 2,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            block_out_channels=(arch.vae_channels,),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=IMAGE_SIZE,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=text.text_encoder,
        tokenizer=text.tokenizer,
        text_encoder_2=text.text_encoder_2,
        tokenizer_2=text.tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )

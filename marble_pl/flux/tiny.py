"""A tiny random FLUX pipeline of the real classes (a few hundred k parameters), for CPU tests
and the CPU smoke config: built in memory, saved with ``save_pretrained`` and loaded back with
``from_pretrained`` (:func:`~marble_pl.flux.components.load_flux`), as the tiny SD3 is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from marble_pl.models import (
    ModelLoadError,
    tiny_clip_config,
    tiny_clip_tokenizer,
    tiny_sd3_is_complete,
    tiny_t5_config,
    tiny_t5_tokenizer,
    tiny_vae,
)
from marble_pl.tiny_build import ensure_built

__all__ = [
    "build_tiny_flux",
    "tiny_flux_configs",
    "ensure_tiny_flux",
    "tiny_flux_is_complete",
    "tiny_flux_pipeline",
]

TINY_CLIP_HIDDEN = 16  # CLIP's pooled output = the transformer's pooled_projection_dim
TINY_JOINT_DIM = 32  # T5's d_model = the transformer's joint_attention_dim


def tiny_flux_pipeline(*, seed: int = 0) -> Any:
    """A randomly initialised tiny ``FluxPipeline`` (guidance embedding on, as FLUX.1-dev).

    Deterministic given ``seed``; the global RNG is left untouched. 16 latent channels packed
    2x2 into the transformer's 64 input channels, as FLUX.1; a VAE of 2x downsampling, so a
    32 px image is 16 x 16 latents, 8 x 8 = 64 image tokens.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TINY_JOINT_DIM,
            pooled_projection_dim=TINY_CLIP_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        vae = tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)
        tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        text_encoder = CLIPTextModel(
            tiny_clip_config(
                tokenizer, hidden_size=TINY_CLIP_HIDDEN, projection_dim=TINY_CLIP_HIDDEN
            )
        )
        text_encoder_2 = T5EncoderModel(
            tiny_t5_config(tokenizer_2, d_model=TINY_JOINT_DIM, feed_forward_proj="gated-gelu")
        )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def tiny_flux_configs() -> dict[str, dict[str, Any]]:
    """``component -> config`` of :func:`tiny_flux_pipeline` (what ``save_pretrained`` writes)."""
    pipe = tiny_flux_pipeline()
    configs = {k: dict(getattr(pipe, k).config) for k in ("transformer", "vae", "scheduler")}
    for key in ("text_encoder", "text_encoder_2"):
        configs[key] = getattr(pipe, key).config.to_dict()
    return configs


def build_tiny_flux(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Build :func:`tiny_flux_pipeline` and ``save_pretrained`` it (safetensors) to ``path``."""
    out = Path(path)
    tiny_flux_pipeline(seed=seed).save_pretrained(out, safe_serialization=True)
    return out


def tiny_flux_is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a whole saved pipeline (model_index.json and every component it lists,
    weights whole): the same test as the tiny SD3's, whose required parts FLUX has too."""
    return tiny_sd3_is_complete(path)


def ensure_tiny_flux(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Build the tiny FLUX at ``path`` unless a complete one is there; a half-written folder is
    rebuilt. Built in a sibling temp directory and renamed into place (a reader never sees a
    partial folder). Under ``torch.distributed``, call it on global rank 0 only."""
    return ensure_built(
        path,
        lambda tmp: build_tiny_flux(tmp, seed=seed),
        tiny_flux_is_complete,
        what="tiny FLUX pipeline",
        error=ModelLoadError,
    )

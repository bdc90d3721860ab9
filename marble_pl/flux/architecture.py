"""FLUX.1-dev's published architecture, as facts (the Hub's ``config.json`` values, no weights).

``black-forest-labs/FLUX.1-dev`` is a ``FluxPipeline``: a 12 B-parameter rectified-flow
transformer (19 double-stream + 38 single-stream blocks, 24 heads x 128, guidance-distilled:
the guidance scale is an input embedding, not classifier-free guidance), the 16-channel VAE,
CLIP ViT-L/14's text tower (pooled only) and T5 v1.1 XXL's encoder (the token sequence).
"""

from __future__ import annotations

from typing import Any

from marble_pl.architectures import _CLIP_L_TEXT, _SD3_VAE, _T5_XXL_ENCODER, shipped_configs

__all__ = [
    "FLUX_COMPONENT_CLASSES",
    "FLUX_DEV",
    "FLUX_PIPELINE",
    "shipped_flux_configs",
]

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_PIPELINE = "FluxPipeline"
"""``model_index.json``'s ``_class_name`` of a FLUX.1 pipeline."""

FLUX_COMPONENT_CLASSES = {
    "transformer": "FluxTransformer2DModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "T5EncoderModel",
    "scheduler": "FlowMatchEulerDiscreteScheduler",
}
"""Each FLUX pipeline component and the class its config builds."""

# 2x2 latent patches are packed before the transformer (16 channels x 4 = in_channels 64), so
# its own patch_size is 1; the rotary axes (16 + 56 + 56 = 128) are (unused, row, column).
_FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

# SD3's VAE layout, with FLUX's own latent statistics.
_FLUX_VAE: dict[str, Any] = {**_SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

# The shift grows with the image's token count: mu from 0.5 at 256 tokens to 1.15 at 4096.
_FLUX_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

_SHIPPED: dict[str, dict[str, dict[str, Any]]] = {
    FLUX_DEV: {
        "transformer": _FLUX_DEV_TRANSFORMER,
        "vae": _FLUX_VAE,
        "text_encoder": _CLIP_L_TEXT,
        "text_encoder_2": _T5_XXL_ENCODER,
        "scheduler": _FLUX_SCHEDULER,
    }
}


def shipped_flux_configs(name: str) -> dict[str, dict[str, Any]] | None:
    """A copy of the shipped component configs of hub id ``name``; None for another model."""
    return shipped_configs(_SHIPPED, name)

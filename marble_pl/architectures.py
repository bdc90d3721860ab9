"""Published architectures of the models marble-pl trains, as facts (configs, no weights).

``random_weights`` builds these at their real shapes when no ``config.json`` can be read from a
local directory or the Hugging Face cache: the only way to exercise real shapes, module names,
dtypes and memory where the weights cannot be downloaded. The values are those of the
``config.json`` files the model's authors published on the Hub.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = [
    "IMAGEREWARD_TEXT",
    "IMAGEREWARD_VISION",
    "SD35_MEDIUM",
    "SD3_COMPONENT_CLASSES",
    "TROCR_BASE_PRINTED",
    "shipped_clip_config",
    "shipped_configs",
    "shipped_mask2former_config",
    "shipped_sd3_configs",
    "shipped_trocr_config",
]

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"

SD3_COMPONENT_CLASSES = {
    "transformer": "SD3Transformer2DModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModelWithProjection",
    "text_encoder_2": "CLIPTextModelWithProjection",
    "text_encoder_3": "T5EncoderModel",
    "scheduler": "FlowMatchEulerDiscreteScheduler",
}
"""Each SD3 pipeline component and the class its config builds."""

# MMDiT-X: 24 joint blocks, width 24 x 64 = 1536; the first 13 add a second (image-only)
# attention ("dual attention"); queries and keys are RMS-normalised.
_SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}

# The SD3 VAE: 16 latent channels, 8x downsampling, no quant convs.
_SD3_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

# What every CLIP text tower here shares: CLIP's BPE vocabulary and 77-token context.
_CLIP_TEXT_COMMON: dict[str, Any] = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# CLIP ViT-L/14's text tower (OpenAI), with its projection.
_CLIP_L_TEXT: dict[str, Any] = {
    **_CLIP_TEXT_COMMON,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
}

# OpenCLIP ViT-bigG/14's text tower, with its projection.
_CLIP_G_TEXT: dict[str, Any] = {
    **_CLIP_TEXT_COMMON,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}

# T5 v1.1 XXL's encoder (gated GELU), 4.8 B parameters.
_T5_XXL_ENCODER: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

_SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

_SHIPPED: dict[str, dict[str, dict[str, Any]]] = {
    SD35_MEDIUM: {
        "transformer": _SD35_MEDIUM_TRANSFORMER,
        "vae": _SD3_VAE,
        "text_encoder": _CLIP_L_TEXT,
        "text_encoder_2": _CLIP_G_TEXT,
        "text_encoder_3": _T5_XXL_ENCODER,
        "scheduler": _SD3_SCHEDULER,
    }
}


def shipped_configs(
    table: dict[str, dict[str, dict[str, Any]]], name: str
) -> dict[str, dict[str, Any]] | None:
    """A copy of ``table``'s component configs of hub id ``name``; None for another model."""
    configs = table.get(name.rstrip("/"))
    return None if configs is None else copy.deepcopy(configs)


def shipped_sd3_configs(name: str) -> dict[str, dict[str, Any]] | None:
    """A copy of the shipped component configs of hub id ``name``; None for another model."""
    return shipped_configs(_SHIPPED, name)


# ------------------------------------------------------------------ reward backbones

# OpenCLIP ViT-H-14 (laion2B): PickScore_v1 is this architecture fine-tuned; HPSv2.1 too.
_CLIP_VIT_H_14: dict[str, Any] = {
    "projection_dim": 1024,
    "text_config": {
        **_CLIP_TEXT_COMMON,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    },
}

# OpenAI CLIP ViT-L/14 (224 px): CLIP score and the LAION aesthetic predictor's backbone.
_CLIP_VIT_L_14: dict[str, Any] = {
    "projection_dim": 768,
    "text_config": {
        **_CLIP_TEXT_COMMON,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_act": "quick_gelu",
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
}

_CLIP_BY_ID = {
    "yuvalkirstain/PickScore_v1": _CLIP_VIT_H_14,
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": _CLIP_VIT_H_14,
    "openai/clip-vit-large-patch14": _CLIP_VIT_L_14,
}


def shipped_clip_config(name: str) -> dict[str, Any] | None:
    """A copy of the shipped CLIPConfig kwargs of hub id ``name``; None for another model."""
    config = _CLIP_BY_ID.get(name.rstrip("/"))
    return None if config is None else copy.deepcopy(config)


# Mask2Former Swin-S, COCO instance segmentation (GenEval's detector): Swin-S backbone (embed 96,
# depths 2-2-18-2, window 7), 6-layer deformable pixel decoder, 10-layer masked-attention decoder,
# 100 queries, 80 COCO classes (labels left generic: GenEval reads them in COCO's order).
_MASK2FORMER_SWIN_S_COCO: dict[str, Any] = {
    "backbone_config": {
        "model_type": "swin",
        "image_size": 224,
        "patch_size": 4,
        "embed_dim": 96,
        "depths": [2, 2, 18, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 7,
        "mlp_ratio": 4.0,
        "drop_path_rate": 0.3,
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    },
    "feature_size": 256,
    "mask_feature_size": 256,
    "hidden_dim": 256,
    "encoder_feedforward_dim": 1024,
    "encoder_layers": 6,
    "decoder_layers": 10,
    "num_attention_heads": 8,
    "dim_feedforward": 2048,
    "num_queries": 100,
    "common_stride": 4,
    "feature_strides": [4, 8, 16, 32],
    "num_labels": 80,
}


def shipped_mask2former_config(name: str) -> dict[str, Any] | None:
    """A copy of the shipped Mask2FormerConfig kwargs of hub id ``name``; None for another."""
    if name.rstrip("/") != "facebook/mask2former-swin-small-coco-instance":
        return None
    return copy.deepcopy(_MASK2FORMER_SWIN_S_COCO)


# ImageReward (THUDM/ImageReward): BLIP's ViT-L/16 at 224 px, and BERT-base with cross-attention
# to it (BLIP's med_config), the [DEC]/[ENC] tokens added to bert-base-uncased's 30522.
IMAGEREWARD_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
}
IMAGEREWARD_TEXT: dict[str, Any] = {
    "vocab_size": 30524,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "encoder_hidden_size": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}


# TrOCR-base (microsoft/trocr-base-printed, -handwritten): a ViT-base encoder at 384 px (16 px
# patches, no query/key/value biases) and a 12-layer RoBERTa-style decoder of width 1024 with
# learned positions, cross-attending to the encoder; the output projection is tied to the token
# embeddings. 334 M parameters (the TrOCR paper's figure).
TROCR_BASE_PRINTED = "microsoft/trocr-base-printed"
_TROCR_BASE: dict[str, dict[str, Any]] = {
    "encoder": {
        "model_type": "vit",
        "image_size": 384,
        "patch_size": 16,
        "num_channels": 3,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "qkv_bias": False,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
    "decoder": {
        "model_type": "trocr",
        "vocab_size": 50265,
        "d_model": 1024,
        "decoder_layers": 12,
        "decoder_attention_heads": 16,
        "decoder_ffn_dim": 4096,
        "activation_function": "gelu",
        "max_position_embeddings": 512,
        "cross_attention_hidden_size": 768,
        "use_learned_position_embeddings": True,
        "layernorm_embedding": True,
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "is_decoder": True,
        "add_cross_attention": True,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
    },
}

_TROCR_BY_ID = {
    TROCR_BASE_PRINTED: _TROCR_BASE,
    "microsoft/trocr-base-handwritten": _TROCR_BASE,
}


def shipped_trocr_config(name: str) -> dict[str, dict[str, Any]] | None:
    """A copy of the shipped ``{"encoder", "decoder"}`` configs of TrOCR hub id ``name``; None
    for another model."""
    config = _TROCR_BY_ID.get(name.rstrip("/"))
    return None if config is None else copy.deepcopy(config)

"""A tiny random FLUX pipeline of the real classes (a few hundred k parameters), for CPU tests
and the CPU smoke config: built in memory, saved with ``save_pretrained`` and loaded back with
``from_pretrained`` (:func:`~marble_pl.flux.components.load_flux`), as the tiny SD3 is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from marble_pl.models import (
    ModelLoadError,
    _rename_into_place,
    _replace_components,
    tiny_clip_tokenizer,
    tiny_sd3_is_complete,
    tiny_t5_tokenizer,
)

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
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TINY_CLIP_HIDDEN,
                intermediate_size=2 * TINY_CLIP_HIDDEN,
                projection_dim=TINY_CLIP_HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=TINY_JOINT_DIM,
                d_kv=8,
                d_ff=2 * TINY_JOINT_DIM,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu",
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
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
    out = Path(path)
    if tiny_flux_is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_tiny_flux(tmp, seed=seed)
        if not tiny_flux_is_complete(tmp):
            raise ModelLoadError(
                f"Building the tiny FLUX pipeline at {out} wrote an incomplete folder (under "
                "torch.distributed, transformers saves on global rank 0 only: build it there)."
            )
        if not _rename_into_place(tmp, out) and not tiny_flux_is_complete(out):
            _replace_components(tmp, out)
    except OSError:
        if not tiny_flux_is_complete(out):  # not another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

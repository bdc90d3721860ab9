"""Tiny random stand-ins of the specialist rewards' models, built on first use for CPU runs.

``configs/tiny_mixed.yaml`` trains on the three-source prompt set offline on a CPU: its ``ocr``
(TrOCR engine) and ``geneval`` (Mask2Former + CLIP) rewards point at local folders and set
``build_tiny_if_missing``, so the first run writes these models there, as ``build_tiny_if_missing``
of the policy writes the tiny SD3. Each folder is a ``save_pretrained`` hub layout of the real
classes (a few hundred thousand parameters), deterministic given its seed, built in a temp
sibling and renamed into place: a reader never sees a partial folder. Scores are noise; the
code path, the applicability and the shapes of the run are real.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

from marble_pl.errors import ConfigError

__all__ = [
    "TINY_IMAGE_SIDE",
    "ensure_tiny",
    "ensure_tiny_clip",
    "ensure_tiny_mask2former",
    "ensure_tiny_trocr",
    "tiny_model_is_complete",
]

TINY_IMAGE_SIDE = 32
"""The side the tiny TrOCR and CLIP resize to (the detector sees at least 64 px)."""

_PREPROCESSOR = "preprocessor_config.json"
_TOKENIZER = "tokenizer_config.json"


def tiny_model_is_complete(path: str | os.PathLike[str], files: tuple[str, ...]) -> bool:
    """Whether ``path`` holds ``config.json``, whole safetensors weights and ``files``."""
    from marble_pl.models import _weights_readable

    root = Path(path)
    if not all((root / name).is_file() for name in ("config.json", *files)):
        return False
    weights = [*root.glob("*.safetensors"), *root.glob("*.bin")]
    return bool(weights) and all(map(_weights_readable, weights))


def ensure_tiny(
    path: str | os.PathLike[str], build: Callable[[Path], None], files: tuple[str, ...]
) -> Path:
    """Run ``build(folder)`` into a temp sibling of ``path`` and rename it into place, unless a
    complete model (:func:`tiny_model_is_complete`) is there already. Races are harmless: the
    builds are identical and the loser's rename fails onto the winner's whole folder. A folder
    that holds other files is never overwritten: that is a one-line error."""
    out = Path(path)
    if tiny_model_is_complete(out, files):
        return out
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"build_tiny_if_missing: {out} holds files but not a whole model (config.json, "
            f"weights, {', '.join(files)}): remove the folder or point the reward elsewhere"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        with suppress(OSError):  # an empty folder goes; another builder winning is harmless
            out.rmdir()
        with suppress(OSError):
            os.rename(tmp, out)
        if not tiny_model_is_complete(out, files):
            raise OSError(f"building the tiny model at {out} left an incomplete folder")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------- TrOCR


def _build_trocr(path: Path, seed: int) -> None:
    """A 1-layer ViT encoder + 1-layer TrOCR decoder (random), the byte-level tokenizer and a
    ViT processor config."""
    from transformers import (
        TrOCRConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    from marble_pl.rewards.ocr_engines import byte_level_roberta_tokenizer

    tokenizer = byte_level_roberta_tokenizer()
    encoder = ViTConfig(
        image_size=TINY_IMAGE_SIDE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    decoder = TrOCRConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        max_position_embeddings=66,  # 64 new tokens past the start token, offset 2
        cross_attention_hidden_size=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionEncoderDecoderModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": TINY_IMAGE_SIDE, "width": TINY_IMAGE_SIDE},
        "resample": 2,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (path / _PREPROCESSOR).write_text(json.dumps(processor, indent=2))


def ensure_tiny_trocr(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """A tiny random TrOCR (``VisionEncoderDecoderModel``) with its tokenizer and processor
    config at ``path``, for ``{name: ocr, engine: trocr}``; built unless already whole."""
    return ensure_tiny(path, lambda p: _build_trocr(p, seed), (_PREPROCESSOR, _TOKENIZER))


# ------------------------------------------------------------------------ Mask2Former, CLIP


def _coco_id2label() -> dict[int, str]:
    from marble_pl.rewards.geneval_rules import COCO_CLASSES

    return dict(enumerate(COCO_CLASSES))


def tiny_mask2former_config(num_queries: int, id2label: dict[int, str]) -> Any:
    """The tiny Mask2Former's config: a Swin backbone of width 16, 32-wide heads, 64 px images."""
    from transformers import Mask2FormerConfig

    return Mask2FormerConfig(
        backbone_config={
            "model_type": "swin",
            "embed_dim": 16,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 2, 2],
            "window_size": 4,
            "image_size": 64,
            "out_features": ["stage1", "stage2", "stage3", "stage4"],
        },
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        num_queries=num_queries,
        id2label=id2label,
    )


def _build_mask2former(path: Path, seed: int) -> None:
    """A tiny random Mask2Former (Swin backbone) over COCO's 80 classes and its processor.

    The class head is drawn wide (std 4) so that some of its 8 queries clear GenEval's 0.3
    confidence on some images: the masks, boxes and CLIP colour path run, not only "nothing
    found".
    """
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former.image_processing_pil_mask2former import (
        Mask2FormerImageProcessorPil,
    )

    config = tiny_mask2former_config(8, _coco_id2label())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config).eval()
        with torch.no_grad():
            model.class_predictor.weight.normal_(0.0, 4.0)
    model.save_pretrained(path)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(
        path
    )


def build_tiny_clip(path: Path, seed: int) -> None:
    """A tiny random ``CLIPModel`` with the byte-level CLIP tokenizer and CLIP's preprocessing."""
    from transformers import CLIPConfig, CLIPModel

    from marble_pl.models import tiny_clip_tokenizer
    from marble_pl.rewards.pretrained import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tokenizer = tiny_clip_tokenizer()
    common: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **common,
        },
        vision_config={"image_size": TINY_IMAGE_SIDE, "patch_size": 8, **common},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": TINY_IMAGE_SIDE},
        "crop_size": {"height": TINY_IMAGE_SIDE, "width": TINY_IMAGE_SIDE},
        "resample": 3,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
    }
    (path / _PREPROCESSOR).write_text(json.dumps(processor, indent=2))


def ensure_tiny_mask2former(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """A tiny random COCO Mask2Former with its image processor at ``path`` (GenEval's
    detector); built unless already whole."""
    return ensure_tiny(path, lambda p: _build_mask2former(p, seed), (_PREPROCESSOR,))


def ensure_tiny_clip(path: str | os.PathLike[str], seed: int = 1) -> Path:
    """A tiny random ``CLIPModel`` with tokenizer and processor config at ``path`` (GenEval's
    colour classifier); built unless already whole."""
    return ensure_tiny(path, lambda p: build_tiny_clip(p, seed), (_PREPROCESSOR, _TOKENIZER))

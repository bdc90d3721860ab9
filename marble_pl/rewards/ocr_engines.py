"""Text recognisers for the OCR reward: ``recognize(images [N,3,H,W] in [0,1]) -> texts``.

- :class:`PaddleOCREngine`: PaddleOCR 2.x as DiffusionNFT / MARBLE call it (English, no angle
  classifier, every line with confidence > 0 joined): the official score. Optional extra.
- :class:`TrOCREngine`: a transformers ``VisionEncoderDecoderModel`` (TrOCR), greedy decoding,
  batched: PyTorch only. A line recogniser without a text detector, so its scores are a proxy
  for PaddleOCR's, not equal to them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from marble_pl.errors import ConfigError
from marble_pl.rewards.pretrained import ImageTransform, RewardLoadError, module_dtype

__all__ = [
    "PADDLE_INSTALL",
    "PaddleOCREngine",
    "TrOCREngine",
    "byte_level_roberta_tokenizer",
    "check_paddle",
    "paddle_text",
    "to_uint8_hwc",
    "trocr_architecture",
    "vit_transform",
]

PADDLE_INSTALL = 'pip install "marble-pl[ocr]"'
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes in image-processor configs
_VIT_MEAN_STD = (0.5, 0.5, 0.5)  # ViTImageProcessor's default (IMAGENET_STANDARD_MEAN/STD)


# ------------------------------------------------------------------------------- PaddleOCR


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """Upstream's conversion: ``(x * 255).round().clamp(0, 255)`` as uint8 ``[N, H, W, 3]`` RGB."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def paddle_text(result: Any) -> str:
    """The text of a PaddleOCR 2.x ``ocr(image)`` result: its lines ``[box, (text, confidence)]``
    with confidence > 0, joined without separator (``[None]``: nothing found, ``""``)."""
    lines = result[0] if result else None
    if not lines:
        return ""
    return "".join(text for _box, (text, confidence) in lines if confidence > 0)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(distribution: str) -> str:
    return importlib.metadata.version(distribution)


def check_paddle(label: str) -> None:
    """Raise a one-line ``ConfigError`` unless PaddleOCR 2.x and PaddlePaddle are importable."""
    missing = [m for m in ("paddleocr", "paddle") if not _installed(m)]
    if missing:
        raise ConfigError(
            f"reward {label!r}: engine 'paddle' needs PaddleOCR 2.x and PaddlePaddle "
            f"({' and '.join(missing)} not installed): {PADDLE_INSTALL}, or set engine: trocr"
        )
    version = _version("paddleocr")
    if not version.startswith("2."):
        raise ConfigError(
            f"reward {label!r}: engine 'paddle' runs the official scorer's PaddleOCR 2.x API "
            f"(PP-OCRv4), found paddleocr {version}: {PADDLE_INSTALL} (pins paddleocr<3)"
        )


class PaddleOCREngine(nn.Module):
    """``PaddleOCR(use_angle_cls=False, lang="en", use_gpu=...)``, one image at a time, as upstream.

    Images go in as upstream passes them (uint8 RGB arrays). An exception on one image warns and
    yields ``None`` (scored 0), upstream's handling. PaddleOCR fetches its models into
    ``~/.paddleocr`` on first use.
    """

    def __init__(self, use_gpu: bool = False) -> None:
        super().__init__()
        from paddleocr import PaddleOCR

        try:
            self.ocr = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=use_gpu, show_log=False)
        except Exception as err:  # paddle raises many kinds; all mean "cannot start"
            raise RewardLoadError(
                f"could not start PaddleOCR ({type(err).__name__}: {err}): it downloads its "
                "models into ~/.paddleocr on first use; run it once on a machine with network "
                "and copy that folder here"
            ) from err

    def recognize(self, images: Tensor) -> list[str | None]:
        texts: list[str | None] = []
        for array in to_uint8_hwc(images):
            try:
                texts.append(paddle_text(self.ocr.ocr(array, cls=False)))
            except Exception as err:  # upstream: print, score 0, go on
                warnings.warn(
                    f"PaddleOCR failed on an image ({type(err).__name__}: {err}); it scores 0, "
                    "as in the official scorer",
                    stacklevel=2,
                )
                texts.append(None)
        return texts


# ----------------------------------------------------------------------------------- TrOCR


def vit_transform(config: Mapping[str, Any]) -> ImageTransform:
    """A ``ViTImageProcessor`` config (TrOCR's ``preprocessor_config.json``) as a tensor
    transform: resize to exactly ``size`` (an int or ``{"height", "width"}``), then normalise."""
    size: tuple[int, int] | None = None
    if config.get("do_resize", True):
        raw = config.get("size", 224)
        if isinstance(raw, int):
            size = (raw, raw)
        elif isinstance(raw, Mapping) and {"height", "width"} <= set(raw):
            size = (int(raw["height"]), int(raw["width"]))
        else:
            raise ValueError(f"unsupported image-processor size {raw!r}: expected an int or h/w")
    resample = int(config.get("resample", 2))
    if resample not in _RESAMPLE:
        raise ValueError(f"unsupported resample {resample}: bilinear (2) or bicubic (3)")
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if config.get("do_normalize", True):
        r, g, b = (float(v) for v in config.get("image_mean", _VIT_MEAN_STD))
        mean = (r, g, b)
        r, g, b = (float(v) for v in config.get("image_std", _VIT_MEAN_STD))
        std = (r, g, b)
    return ImageTransform(
        size=size, crop=None, mean=mean, std=std, interpolation=_RESAMPLE[resample]
    )


def byte_level_roberta_tokenizer() -> Any:
    """A byte-level ``RobertaTokenizer`` from Python objects (no merges, no file): decodes the
    random-weights model's ids; ids past its 261 tokens decode to nothing."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[])


def trocr_architecture(name: str) -> Any:
    """The ``VisionEncoderDecoderConfig`` of ``name``: its local or cached ``config.json``, else
    the published one shipped in :mod:`marble_pl.architectures`."""
    from transformers import VisionEncoderDecoderConfig

    from marble_pl.architectures import TROCR_BASE_PRINTED, shipped_trocr_config

    try:
        return VisionEncoderDecoderConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        shipped = shipped_trocr_config(name)
    if shipped is None:
        raise RewardLoadError(
            f"cannot build the TrOCR {name!r} with random weights: its config.json is neither "
            f"local, cached nor shipped (shipped: {TROCR_BASE_PRINTED}, "
            "microsoft/trocr-base-handwritten)"
        )
    return VisionEncoderDecoderConfig(**shipped)


class TrOCREngine(nn.Module):
    """Greedy TrOCR decoding in batches of ``batch_size``, up to ``max_new_tokens`` tokens,
    detokenised with special tokens skipped."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        transform: ImageTransform,
        *,
        max_new_tokens: int,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def generation_config(self) -> Any:
        """Greedy search with the model's special tokens; nothing else taken from the hub."""
        from transformers import GenerationConfig

        source, decoder = self.model.generation_config, self.model.config.decoder

        def token(key: str) -> int | None:
            value = getattr(source, key, None)
            return value if value is not None else getattr(decoder, key, None)

        positions = getattr(decoder, "max_position_embeddings", None)  # learned: a hard limit
        longest = (
            self.max_new_tokens if positions is None else min(self.max_new_tokens, positions - 1)
        )
        return GenerationConfig(
            max_new_tokens=longest,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            decoder_start_token_id=token("decoder_start_token_id"),
            bos_token_id=token("bos_token_id"),
            eos_token_id=token("eos_token_id"),
            pad_token_id=token("pad_token_id"),
        )

    def recognize(self, images: Tensor) -> list[str | None]:
        config, dtype = self.generation_config(), module_dtype(self.model)
        texts: list[str | None] = []
        for chunk in images.split(self.batch_size):
            pixels = self.transform(chunk).to(dtype)
            ids = self.model.generate(pixel_values=pixels, generation_config=config)
            texts += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return texts

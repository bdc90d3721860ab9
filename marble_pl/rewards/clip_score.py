"""CLIP score: how well an image matches its prompt under a CLIP model (Hessel et al., 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from marble_pl.models import tiny_clip_tokenizer
from marble_pl.rewards.pretrained import (
    ImageTransform,
    PretrainedReward,
    clip_architecture,
    clip_crop_transform,
    clip_features,
    hub_guard_errors,
    load_json,
    module_dtype,
    require_local,
)
from marble_pl.rewards.registry import register_reward

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

__all__ = ["LAION_CLIP_H", "OPENAI_CLIP_L", "CLIPRewardBase", "CLIPScore"]

LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_CLIP_L = "openai/clip-vit-large-patch14"


class CLIPRewardBase(PretrainedReward):
    """A transformers ``CLIPModel`` with its tokenizer and image-processor settings.

    The model comes from ``pretrained_model_name_or_path``; tokenizer and
    ``preprocessor_config.json`` from ``processor_name_or_path`` (default: the same id).
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        processor_name_or_path: str | None = None,
        *,
        max_length: int = 77,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        self.processor_name_or_path = str(processor_name_or_path or pretrained_model_name_or_path)
        if max_length < 2:
            raise ValueError(f"reward {self.name!r}: max_length must be >= 2, got {max_length}")
        self.max_length = int(max_length)
        self.tokenizer: CLIPTokenizer | None = None
        self.transform: ImageTransform | None = None

    def _load_processor(self) -> None:
        """CLIP tokenizer and the image-processor config of ``processor_name_or_path``."""
        from transformers import CLIPTokenizer

        name = self.processor_name_or_path
        revision = self.revision if name == self.pretrained_model_name_or_path else None
        try:
            require_local(name)
            self.tokenizer = CLIPTokenizer.from_pretrained(
                name, local_files_only=self.offline, cache_dir=self.cache_dir, revision=revision
            )
            config = load_json(
                name,
                "preprocessor_config.json",
                local_files_only=self.offline,
                cache_dir=self.cache_dir,
                revision=revision,
            )
        except hub_guard_errors() as err:
            raise self._load_error(
                "the CLIP tokenizer / preprocessor_config.json",
                name,
                err,
                download=f'hf download {name} --include "*.json" "*.txt"',
                option="processor_name_or_path",
            ) from err
        self.transform = ImageTransform.from_processor_config(config)

    def _load_clip(self) -> nn.Module:
        """``CLIPModel.from_pretrained(pretrained_model_name_or_path)`` in ``dtype``."""
        from transformers import CLIPModel

        name = self.pretrained_model_name_or_path
        try:
            require_local(name)
            return CLIPModel.from_pretrained(
                name,
                local_files_only=self.offline,
                cache_dir=self.cache_dir,
                revision=self.revision,
                dtype=self.torch_dtype,
            )
        except hub_guard_errors() as err:
            raise self._load_error(
                "the CLIP model",
                name,
                err,
                download=f"hf download {name}",
                option="pretrained_model_name_or_path",
            ) from err

    def _build(self) -> nn.Module:
        model = self._load_clip()
        self._load_processor()
        return model

    def _build_random(self) -> nn.Module:
        """The CLIP of ``pretrained_model_name_or_path`` at its real shape, random weights."""
        from transformers import CLIPModel

        from marble_pl.random_weights import random_module

        config = clip_architecture(self.pretrained_model_name_or_path)
        self.tokenizer = tiny_clip_tokenizer()  # byte-level: no files
        self.transform = clip_crop_transform(int(config.vision_config.image_size))
        return random_module(lambda: CLIPModel(config), self.torch_dtype)

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Cosine similarity ``[N]`` of each image's and its prompt's CLIP embeddings."""
        assert self.tokenizer is not None and self.transform is not None and self.scorer is not None
        model = self.scorer
        device, dtype = images.device, module_dtype(model)
        text = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        pixels = self.transform(images).to(dtype)
        image_emb, text_emb = clip_features(
            model,
            pixel_values=pixels,
            input_ids=text["input_ids"].to(device),
            attention_mask=text["attention_mask"].to(device),
        )
        assert image_emb is not None and text_emb is not None
        return (image_emb * text_emb).sum(dim=-1)


@register_reward("clip_score")
class CLIPScore(CLIPRewardBase):
    """CLIP score of each image against its prompt: ``scale * max(cos(image, prompt), 0)``.

    With the defaults this is torchmetrics' ``CLIPScore`` (``openai/clip-vit-large-patch14``,
    ``100 * cos``, in ``[0, 100]``, typically 20-35), taken per image: torchmetrics clamps the
    batch mean at 0, here each score is clamped, as Hessel et al. define CLIP-S (with
    ``w = 2.5``: set ``scale: 2.5``). ``clamp_negative: false`` gives the plain scaled cosine.

    Weights, tokenizer and ``preprocessor_config.json`` from ``pretrained_model_name_or_path``
    (transformers ``CLIPModel``): resize shortest edge to 224 bicubic, center crop 224, CLIP
    mean/std; CLIP BPE truncated to 77 tokens. Offline: ``hf download
    openai/clip-vit-large-patch14``.

    Args:
        pretrained_model_name_or_path: hub id or local ``save_pretrained`` directory.
        processor_name_or_path: tokenizer / preprocessor location (default: the model's).
        scale: multiplier of the cosine (torchmetrics: 100).
        clamp_negative: clamp each score at 0 (CLIP-S and torchmetrics do).
        max_length: token limit (CLIP's 77).
        local_files_only, cache_dir, revision: passed to the hub (no network when set).
        device, dtype, offload_to_cpu: placement, see :class:`PretrainedReward`.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = OPENAI_CLIP_L,
        processor_name_or_path: str | None = None,
        scale: float = 100.0,
        clamp_negative: bool = True,
        max_length: int = 77,
        local_files_only: bool = False,
        cache_dir: str | None = None,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        offload_to_cpu: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(
            pretrained_model_name_or_path,
            processor_name_or_path,
            max_length=max_length,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            revision=revision,
            device=device,
            dtype=dtype,
            offload_to_cpu=offload_to_cpu,
            name=name,
        )
        if not scale > 0:
            raise ValueError(f"reward {self.name!r}: scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.clamp_negative = bool(clamp_negative)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``scale * cos``, clamped at 0 unless ``clamp_negative`` is False."""
        cos = self.cosine(images, prompts)
        return self.scale * (cos.clamp_min(0.0) if self.clamp_negative else cos)

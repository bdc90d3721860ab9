"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic human preferences."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from marble_pl.rewards.clip_score import LAION_CLIP_H, CLIPRewardBase
from marble_pl.rewards.registry import register_reward

__all__ = ["PickScore"]


@register_reward("pickscore")
class PickScore(CLIPRewardBase):
    """PickScore v1: ``logit_scale.exp() * cos(image, prompt)`` of a CLIP-H fine-tuned on
    Pick-a-Pic (about 18-24 for typical generations; higher is preferred).

    Weights: hub ``yuvalkirstain/PickScore_v1`` (transformers ``CLIPModel``); tokenizer and image
    preprocessing from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` as in the authors' example
    (resize shortest edge to 224 bicubic, center crop 224, CLIP mean/std; CLIP BPE, 77 tokens).
    To run offline::

        hf download yuvalkirstain/PickScore_v1
        hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include "*.json" "*.txt"

    YAML: ``{"name": "pickscore", "dtype": "bfloat16", "device": "cuda:1"}``.

    Args:
        pretrained_model_name_or_path: hub id or local ``save_pretrained`` directory.
        processor_name_or_path: where the tokenizer and ``preprocessor_config.json`` live.
        max_length: token limit (CLIP's 77).
        local_files_only, cache_dir, revision: passed to the hub (no network when set).
        device, dtype, offload_to_cpu: placement, see :class:`PretrainedReward`.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = "yuvalkirstain/PickScore_v1",
        processor_name_or_path: str | None = LAION_CLIP_H,
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

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``exp(logit_scale) * cos``, the authors' ``scores`` before their softmax."""
        assert self.scorer is not None
        scale = self.scorer.logit_scale.detach().float().exp()
        return scale.to(images.device) * self.cosine(images, prompts)

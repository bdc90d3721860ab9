"""The LAION improved aesthetic predictor (Schuhmann, 2022): an MLP on CLIP ViT-L/14 features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marble_pl.rewards.clip_score import OPENAI_CLIP_L
from marble_pl.rewards.pretrained import (
    ImageTransform,
    PreferenceMLP,
    PretrainedReward,
    RewardLoadError,
    clip_architecture,
    clip_crop_transform,
    hub_guard_errors,
    load_json,
    module_dtype,
    quiet_transformers,
    require_local,
    resolve_file,
    torch_load_weights,
)
from marble_pl.rewards.registry import register_reward

__all__ = ["Aesthetic", "AestheticScorer"]


class AestheticScorer(nn.Module):
    """CLIP vision tower with projection, then :class:`PreferenceMLP` on the L2-normalised
    image embedding (the head runs in float32, as the authors' numpy features do)."""

    def __init__(self, vision: nn.Module, head: PreferenceMLP) -> None:
        super().__init__()
        self.vision = vision
        self.head = head

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[N, 3, S, S]`` normalised pixels -> ``[N]`` aesthetic scores."""
        embeds = self.vision(pixel_values=pixel_values).image_embeds
        embeds = F.normalize(embeds.float(), dim=-1)
        return self.head(embeds.to(module_dtype(self.head))).squeeze(-1).float()


@register_reward("aesthetic")
class Aesthetic(PretrainedReward):
    """LAION improved aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE``): a linear MLP
    on the L2-normalised CLIP ViT-L/14 image embedding; about 1-10 (AVA rating scale), higher
    is prettier. Ignores the prompt.

    CLIP: transformers ``CLIPVisionModelWithProjection`` from ``openai/clip-vit-large-patch14``
    (the OpenAI ViT-L/14 the predictor was trained on; resize shortest edge 224 bicubic, center
    crop 224, CLIP mean/std from its ``preprocessor_config.json``). Head: the authors'
    ``sac+logos+ava1-l14-linearMSE.pth`` (mirrored on the hub as
    ``trl-lib/ddpo-aesthetic-predictor`` / ``aesthetic-model.pth``, the file DDPO and TRL use),
    or a local copy of the original ``.pth``. Offline::

        hf download openai/clip-vit-large-patch14
        hf download trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth

    Args:
        pretrained_model_name_or_path: the CLIP model (hub id or local directory).
        weights_name_or_path: head weights: hub repo, local directory, or the ``.pth`` file.
        weights_filename: the head's file name in that repo / directory.
        local_files_only, cache_dir, revision: passed to the hub (no network when set).
        device, dtype, offload_to_cpu: placement, see :class:`PretrainedReward`.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = OPENAI_CLIP_L,
        weights_name_or_path: str = "trl-lib/ddpo-aesthetic-predictor",
        weights_filename: str = "aesthetic-model.pth",
        local_files_only: bool = False,
        cache_dir: str | None = None,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        offload_to_cpu: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            revision=revision,
            device=device,
            dtype=dtype,
            offload_to_cpu=offload_to_cpu,
            name=name,
        )
        self.pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        self.weights_name_or_path = str(weights_name_or_path)
        self.weights_filename = str(weights_filename)
        self.transform: ImageTransform | None = None

    def _build(self) -> nn.Module:
        from transformers import CLIPVisionModelWithProjection

        clip = self.pretrained_model_name_or_path
        hub = {"local_files_only": self.offline, "cache_dir": self.cache_dir}
        try:
            require_local(clip)
            with quiet_transformers():  # the text tower's keys are "unexpected": not needed
                vision = CLIPVisionModelWithProjection.from_pretrained(
                    clip, revision=self.revision, dtype=self.torch_dtype, **hub
                )
            config = load_json(clip, "preprocessor_config.json", revision=self.revision, **hub)
        except hub_guard_errors() as err:
            raise self._load_error(
                "the CLIP ViT-L/14 model / preprocessor_config.json",
                clip,
                err,
                download=f"hf download {clip}",
                option="pretrained_model_name_or_path",
            ) from err
        weights = self.weights_name_or_path
        try:
            path = resolve_file(weights, self.weights_filename, **hub)
        except hub_guard_errors() as err:
            raise self._load_error(
                f"the aesthetic MLP {self.weights_filename!r} from",
                weights,
                err,
                download=f"hf download {weights} {self.weights_filename}",
                option="weights_name_or_path",
            ) from err
        try:
            head = PreferenceMLP.from_state_dict(torch_load_weights(path))
        except (ValueError, RuntimeError) as err:
            raise RewardLoadError(f"reward {self.name!r}: {path}: {err}") from err
        embed_dim = int(vision.config.projection_dim)
        if head.input_size != embed_dim:
            raise RewardLoadError(
                f"reward {self.name!r}: the MLP in {path} takes {head.input_size}-d features but "
                f"{clip!r} projects to {embed_dim}: use the CLIP the head was trained on "
                "(openai/clip-vit-large-patch14 for the LAION predictor)"
            )
        # The authors preprocess with OpenAI CLIP's torchvision Resize + CenterCrop.
        self.transform = replace(
            ImageTransform.from_processor_config(config), crop_rounding="round"
        )
        return AestheticScorer(vision, head)

    def _build_random(self) -> nn.Module:
        """CLIP ViT-L/14's vision tower and the MLP head at their real shapes, random weights."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from marble_pl.random_weights import random_module

        clip = clip_architecture(self.pretrained_model_name_or_path)
        config = CLIPVisionConfig(
            **clip.vision_config.to_dict() | {"projection_dim": clip.projection_dim}
        )
        vision = random_module(lambda: CLIPVisionModelWithProjection(config), self.torch_dtype)
        head = random_module(lambda: PreferenceMLP(int(config.projection_dim)), torch.float32)
        self.transform = replace(clip_crop_transform(int(config.image_size)), crop_rounding="round")
        return AestheticScorer(vision, head)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The MLP's rating of each image (prompts are ignored)."""
        scorer = self.scorer
        assert scorer is not None and self.transform is not None
        return scorer(self.transform(images).to(module_dtype(scorer.vision)))

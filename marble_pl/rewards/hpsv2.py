"""HPSv2.1 (Wu et al., 2023): an open_clip ViT-H-14 fine-tuned on Human Preference Dataset v2.

The authors ship an open_clip checkpoint; it is loaded here into transformers' ``CLIPModel``
(the same architecture) by renaming its keys with :func:`open_clip_to_transformers`, so neither
open_clip nor torchvision is needed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from marble_pl.models import tiny_clip_tokenizer
from marble_pl.rewards.clip_score import LAION_CLIP_H
from marble_pl.rewards.pretrained import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    PretrainedReward,
    RewardLoadError,
    check_loading_info,
    clip_architecture,
    clip_features,
    hub_guard_errors,
    module_dtype,
    require_local,
    resolve_file,
    torch_load_weights,
)
from marble_pl.rewards.registry import register_reward

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

__all__ = ["HPSv2", "open_clip_to_transformers"]

_FIXED = {
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {  # open_clip multiplies x @ proj; nn.Linear stores proj.T
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_IGNORED = {"attn_mask", "visual.attn_mask"}  # causal-mask buffers, rebuilt by transformers


def open_clip_to_transformers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip ``CLIP`` state dict (ViT image tower, default text tower) to the
    keys of transformers' ``CLIPModel``.

    ``attn.in_proj_weight/bias`` split into ``q_proj``, ``k_proj``, ``v_proj``; ``proj`` and
    ``text_projection`` are transposed into ``nn.Linear`` weights; ``conv1``, ``ln_pre``,
    ``ln_post``, ``ln_final``, ``c_fc``, ``c_proj`` map to their transformers names. A key
    with no counterpart (LayerScale, attention pooling, a custom text tower) raises ValueError
    rather than being dropped: the converted model would compute something else.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key in _IGNORED:
            continue
        if key in _FIXED:
            out[_FIXED[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        match = _BLOCK.match(key)
        if match is None:
            unknown.append(key)
            continue
        visual, index, rest = match.groups()
        prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[-1]  # weight / bias
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
            continue
        module, _, param = rest.rpartition(".")
        if module not in _BLOCK_PARTS:
            unknown.append(key)
            continue
        out[f"{prefix}{_BLOCK_PARTS[module]}.{param}"] = value
    if unknown:
        raise ValueError(
            f"open_clip keys with no transformers CLIPModel counterpart: {sorted(unknown)[:8]}"
            f"{' ...' if len(unknown) > 8 else ''} (only plain ViT CLIP checkpoints convert)"
        )
    return out


@register_reward("hpsv2")
class HPSv2(PretrainedReward):
    """Human Preference Score v2.1: ``cos(image, prompt)`` of the HPSv2.1 CLIP ViT-H-14
    (about 0.25-0.35 for typical generations; higher is preferred).

    Weights: ``HPS_v2.1_compressed.pt`` from hub ``xswu/HPSv2`` (an open_clip checkpoint,
    read with ``torch.load(weights_only=True)`` and renamed to transformers' ``CLIPModel``);
    architecture config and CLIP tokenizer from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
    (its ``config.json`` and tokenizer files only: the HPS file replaces every weight).
    Preprocessing as the authors' ``preprocess_val``: resize the longest edge to 224 bicubic,
    pad with black to 224 x 224, CLIP mean/std. Offline::

        hf download xswu/HPSv2 HPS_v2.1_compressed.pt
        hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include "*.json" "*.txt"

    Args:
        pretrained_model_name_or_path: config + tokenizer (hub id or local directory).
        weights_name_or_path: hub repo, local directory or the checkpoint file itself.
        weights_filename: the checkpoint's name in that repo / directory (``HPS_v2_compressed.pt``
            for HPSv2.0).
        max_length: token limit (77).
        local_files_only, cache_dir, revision: passed to the hub (no network when set).
        device, dtype, offload_to_cpu: placement, see :class:`PretrainedReward`.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = LAION_CLIP_H,
        weights_name_or_path: str = "xswu/HPSv2",
        weights_filename: str = "HPS_v2.1_compressed.pt",
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
        self.max_length = int(max_length)
        self.tokenizer: CLIPTokenizer | None = None
        self.transform: ImageTransform | None = None

    def _build(self) -> nn.Module:
        from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

        base = self.pretrained_model_name_or_path
        try:
            require_local(base)
            config = CLIPConfig.from_pretrained(
                base, local_files_only=self.offline, cache_dir=self.cache_dir
            )
            self.tokenizer = CLIPTokenizer.from_pretrained(
                base, local_files_only=self.offline, cache_dir=self.cache_dir
            )
        except hub_guard_errors() as err:
            raise self._load_error(
                "the ViT-H-14 config / tokenizer",
                base,
                err,
                download=f'hf download {base} --include "*.json" "*.txt"',
                option="pretrained_model_name_or_path",
            ) from err
        weights = self.weights_name_or_path
        try:
            path = resolve_file(
                weights,
                self.weights_filename,
                local_files_only=self.offline,
                cache_dir=self.cache_dir,
                revision=self.revision,
            )
        except hub_guard_errors() as err:
            raise self._load_error(
                f"the HPS checkpoint {self.weights_filename!r} from",
                weights,
                err,
                download=f"hf download {weights} {self.weights_filename}",
                option="weights_name_or_path",
            ) from err
        try:
            converted = open_clip_to_transformers(torch_load_weights(path))
        except ValueError as err:
            raise RewardLoadError(f"reward {self.name!r}: {path}: {err}") from err
        try:
            model, info = CLIPModel.from_pretrained(
                None,
                config=config,
                state_dict=converted,
                dtype=self.torch_dtype,
                output_loading_info=True,
            )
        except RuntimeError as err:  # shape mismatches
            raise RewardLoadError(
                f"reward {self.name!r}: the weights in {path} do not fit the architecture in "
                f"{base!r} (pass the config the checkpoint was trained with): {err}"
            ) from err
        check_loading_info(self.name, str(path), info)
        size = int(config.vision_config.image_size)
        self.transform = ImageTransform(  # ToTensor, then ResizeMaxSize on the float tensor
            size=size,
            crop=None,
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            mode="pad",
            clamp=False,
        )
        return model

    def _build_random(self) -> nn.Module:
        """ViT-H-14 (``pretrained_model_name_or_path``'s architecture) with random weights."""
        from transformers import CLIPModel

        from marble_pl.random_weights import random_module

        config = clip_architecture(self.pretrained_model_name_or_path)
        self.tokenizer = tiny_clip_tokenizer()  # byte-level: no files
        self.transform = ImageTransform(
            size=int(config.vision_config.image_size),
            crop=None,
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            mode="pad",
            clamp=False,
        )
        return random_module(lambda: CLIPModel(config), self.torch_dtype)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Cosine of the normalised image and text features (the authors' ``hps_score``)."""
        model = self.scorer
        assert model is not None and self.tokenizer is not None and self.transform is not None
        text = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        pixels = self.transform(images).to(module_dtype(model))
        image_emb, text_emb = clip_features(
            model,
            pixel_values=pixels,
            input_ids=text["input_ids"].to(images.device),
            attention_mask=text["attention_mask"].to(images.device),
        )
        assert image_emb is not None and text_emb is not None
        return (image_emb * text_emb).sum(dim=-1).to(torch.float32)

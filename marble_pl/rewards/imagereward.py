"""ImageReward (Xu et al., 2023): BLIP image-grounded text encoder + MLP, trained on ImageRewardDB.

The authors' checkpoint holds the BLIP modules of their own code base (a timm-style ViT-L/16
and a BERT with cross-attention, ``med.py``). Both exist in transformers as ``BlipVisionModel``
and ``BlipTextModel``; :func:`blip_to_transformers` renames the keys, so no BLIP code is vendored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from marble_pl.rewards.pretrained import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    PreferenceMLP,
    PretrainedReward,
    RewardLoadError,
    check_loading_info,
    hub_guard_errors,
    load_json,
    module_dtype,
    require_local,
    resolve_file,
    sqrt_int,
    torch_load_weights,
)
from marble_pl.rewards.registry import register_reward

if TYPE_CHECKING:
    from transformers import BertTokenizer

__all__ = ["ImageReward", "ImageRewardScorer", "blip_to_transformers"]

log = logging.getLogger(__name__)

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072

_VISION_FIXED = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = re.compile(
    r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(.+)$"
)
_VISION_PARTS = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def blip_to_transformers(
    state_dict: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], list[str]]:
    """Split an ImageReward state dict into transformers-named parts.

    Returns ``(vision, text, head, ignored)``: ``blip.visual_encoder.*`` renamed for
    ``BlipVisionModel`` (``cls_token`` -> ``embeddings.class_embedding``, ``blocks.i.attn.qkv``
    -> ``encoder.layers.i.self_attn.qkv``, ``norm`` -> ``post_layernorm``, ...),
    ``blip.text_encoder.*`` for ``BlipTextModel`` (same names: transformers ported BLIP's
    ``med.py``; the ``position_ids`` buffer and a pooler are dropped), ``mlp.*`` for
    :class:`PreferenceMLP`, and the keys scoring does not use (``blip.vision_proj``,
    ``blip.text_proj``, ...), which the authors' ``load_state_dict(strict=False)`` also leaves
    aside. An unknown key inside the visual encoder raises ValueError.
    """
    vision: dict[str, Tensor] = {}
    text: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            if rest in _VISION_FIXED:
                vision[_VISION_FIXED[rest]] = value
                continue
            match = _VISION_BLOCK.match(rest)
            if match is None:
                unknown.append(key)
                continue
            index, part, param = match.groups()
            vision[f"encoder.layers.{index}.{_VISION_PARTS[part]}.{param}"] = value
        elif key.startswith("blip.text_encoder."):
            rest = key.removeprefix("blip.text_encoder.")
            if rest == "embeddings.position_ids" or rest.startswith("pooler."):
                ignored.append(key)
            else:
                text[rest] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        else:
            ignored.append(key)
    if unknown:
        raise ValueError(
            f"visual-encoder keys with no BlipVisionModel counterpart: {sorted(unknown)[:8]}"
        )
    if not vision or not text or not head:
        missing = [
            n
            for n, d in (("visual_encoder", vision), ("text_encoder", text), ("mlp", head))
            if not d
        ]
        raise ValueError(
            f"no blip.{'/'.join(missing)} weights found: not an ImageReward checkpoint "
            f"(keys start {sorted(state_dict)[:4]})"
        )
    return vision, text, head, ignored


def blip_transform(size: int) -> ImageTransform:
    """BLIP's preprocessing: torchvision Resize + CenterCrop on the PIL image, CLIP mean/std."""
    return ImageTransform(
        size=size,
        crop=(size, size),
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        crop_rounding="round",
    )


def _vision_config(vision: Mapping[str, Tensor], num_heads: int) -> dict[str, Any]:
    """BLIP ViT hyper-parameters read off the weights' shapes (only the heads are not)."""
    hidden = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    grid = sqrt_int(int(vision["embeddings.position_embedding"].shape[1]) - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    if hidden % num_heads:
        raise ValueError(f"vision width {hidden} is not divisible by {num_heads} heads")
    return {
        "hidden_size": hidden,
        "intermediate_size": int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": num_heads,
        "patch_size": patch,
        "image_size": grid * patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
        "attention_dropout": 0.0,
    }


def _text_config(
    med: Mapping[str, Any], encoder_width: int, tokenizer: BertTokenizer
) -> dict[str, Any]:
    """``BlipTextConfig`` kwargs from BLIP's ``med_config.json`` (a BertConfig) and the
    tokenizer's special ids (bos ``[DEC]``, sep/eos ``[SEP]``; unused when encoding)."""
    if not med.get("add_cross_attention", True):
        raise ValueError("med_config.json has add_cross_attention=false: ImageReward needs it")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported (BLIP's default)")
    return {
        "vocab_size": int(med["vocab_size"]),
        "hidden_size": int(med["hidden_size"]),
        "encoder_hidden_size": encoder_width,  # BLIP sets encoder_width = vision_width
        "intermediate_size": int(med["intermediate_size"]),
        "num_hidden_layers": int(med["num_hidden_layers"]),
        "num_attention_heads": int(med["num_attention_heads"]),
        "max_position_embeddings": int(med["max_position_embeddings"]),
        "hidden_act": med.get("hidden_act", "gelu"),
        "layer_norm_eps": float(med.get("layer_norm_eps", 1e-12)),
        "hidden_dropout_prob": float(med.get("hidden_dropout_prob", 0.1)),
        "attention_probs_dropout_prob": float(med.get("attention_probs_dropout_prob", 0.1)),
        "pad_token_id": int(med.get("pad_token_id", 0)),
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "is_decoder": True,  # transformers builds the cross-attention layers only then
    }


class ImageRewardScorer(nn.Module):
    """BLIP ViT -> BLIP text encoder cross-attending to it -> [CLS] feature -> MLP -> z-score."""

    def __init__(self, vision: nn.Module, text: nn.Module, head: PreferenceMLP) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.head = head

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Normalised rewards ``[N]``, as the authors' ``ImageReward.score``."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(
            image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
        )
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        features = out.last_hidden_state[:, 0, :].float()
        rewards = self.head(features.to(module_dtype(self.head))).squeeze(-1).float()
        return (rewards - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


@register_reward("imagereward")
class ImageReward(PretrainedReward):
    """ImageReward v1.0: ``(MLP(BLIP(image, prompt)[CLS]) - 0.1672) / 1.0333`` (roughly a
    z-score over the authors' data, about -2 to 2; higher is preferred).

    Weights: ``ImageReward.pt`` and ``med_config.json`` from hub ``THUDM/ImageReward`` (the
    authors' state dict, read with ``torch.load(weights_only=True)`` and renamed onto
    transformers' ``BlipVisionModel`` / ``BlipTextModel``); tokenizer: BERT ``bert-base-uncased``
    plus BLIP's ``[DEC]`` / ``[ENC]`` special tokens, padded/truncated to 35 tokens. Images:
    resize shortest edge to 224 bicubic, center crop 224, CLIP mean/std (the authors'
    ``_transform(224)``). Offline::

        hf download THUDM/ImageReward ImageReward.pt med_config.json
        hf download google-bert/bert-base-uncased --include "*.json" "*.txt"

    Args:
        pretrained_model_name_or_path: hub repo or local directory with the two files.
        weights_filename, config_filename: their names there.
        tokenizer_name_or_path: the BERT tokenizer (hub id or local directory).
        vision_num_attention_heads: heads of the ViT (16 for ImageReward's ViT-L; the other
            ViT sizes are read from the weights).
        max_length: prompt tokens (35, the authors' value).
        local_files_only, cache_dir, revision: passed to the hub (no network when set).
        device, dtype, offload_to_cpu: placement, see :class:`PretrainedReward`.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = "THUDM/ImageReward",
        weights_filename: str = "ImageReward.pt",
        config_filename: str = "med_config.json",
        tokenizer_name_or_path: str = "google-bert/bert-base-uncased",
        vision_num_attention_heads: int = 16,
        max_length: int = 35,
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
        if vision_num_attention_heads < 1 or max_length < 2:
            raise ValueError(
                f"reward {self.name!r}: need vision_num_attention_heads >= 1 and max_length >= 2, "
                f"got {vision_num_attention_heads} and {max_length}"
            )
        self.pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        self.weights_filename = str(weights_filename)
        self.config_filename = str(config_filename)
        self.tokenizer_name_or_path = str(tokenizer_name_or_path)
        self.vision_num_attention_heads = int(vision_num_attention_heads)
        self.max_length = int(max_length)
        self.tokenizer: BertTokenizer | None = None
        self.transform: ImageTransform | None = None

    def _load_tokenizer(self) -> BertTokenizer:
        """BLIP's ``init_tokenizer``: BERT uncased plus ``[DEC]`` (bos) and ``[ENC]``."""
        from transformers import BertTokenizer

        name = self.tokenizer_name_or_path
        try:
            require_local(name)
            tokenizer = BertTokenizer.from_pretrained(
                name, local_files_only=self.offline, cache_dir=self.cache_dir
            )
        except hub_guard_errors() as err:
            raise self._load_error(
                "the BERT tokenizer",
                name,
                err,
                download=f'hf download {name} --include "*.json" "*.txt"',
                option="tokenizer_name_or_path",
            ) from err
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tokenizer

    def _build(self) -> nn.Module:
        from transformers import (
            BlipTextConfig,
            BlipTextModel,
            BlipVisionConfig,
            BlipVisionModel,
        )

        repo = self.pretrained_model_name_or_path
        hub = {
            "local_files_only": self.offline,
            "cache_dir": self.cache_dir,
            "revision": self.revision,
        }
        try:
            path = resolve_file(repo, self.weights_filename, **hub)
            med = load_json(repo, self.config_filename, **hub)
        except hub_guard_errors() as err:
            raise self._load_error(
                f"{self.weights_filename!r} / {self.config_filename!r} from",
                repo,
                err,
                download=f"hf download {repo} {self.weights_filename} {self.config_filename}",
                option="pretrained_model_name_or_path",
            ) from err
        self.tokenizer = self._load_tokenizer()
        try:
            vision_sd, text_sd, head_sd, ignored = blip_to_transformers(torch_load_weights(path))
            vision_cfg = BlipVisionConfig(
                **_vision_config(vision_sd, self.vision_num_attention_heads)
            )
            text_cfg = BlipTextConfig(**_text_config(med, vision_cfg.hidden_size, self.tokenizer))
            head = PreferenceMLP.from_state_dict(head_sd)
        except (ValueError, KeyError, RuntimeError) as err:
            raise RewardLoadError(f"reward {self.name!r}: {path}: {err}") from err
        if ignored:
            log.debug("imagereward: keys not used for scoring: %s", ignored)
        if len(self.tokenizer) > text_cfg.vocab_size:
            raise RewardLoadError(
                f"reward {self.name!r}: the tokenizer {self.tokenizer_name_or_path!r} has "
                f"{len(self.tokenizer)} tokens with [DEC]/[ENC] but the text encoder only "
                f"{text_cfg.vocab_size}: use bert-base-uncased, as ImageReward does"
            )
        try:
            vision, vision_info = BlipVisionModel.from_pretrained(
                None,
                config=vision_cfg,
                state_dict=vision_sd,
                dtype=self.torch_dtype,
                output_loading_info=True,
            )
            text, text_info = BlipTextModel.from_pretrained(
                None,
                config=text_cfg,
                state_dict=text_sd,
                dtype=self.torch_dtype,
                add_pooling_layer=False,
                output_loading_info=True,
            )
        except RuntimeError as err:  # shape mismatches
            raise RewardLoadError(
                f"reward {self.name!r}: the weights in {path} do not fit {self.config_filename} "
                f"and vision_num_attention_heads={self.vision_num_attention_heads}: {err}"
            ) from err
        check_loading_info(self.name, f"{path} (visual encoder)", vision_info)
        check_loading_info(self.name, f"{path} (text encoder)", text_info)
        size = int(vision_cfg.image_size)
        self.transform = blip_transform(size)
        return ImageRewardScorer(vision, text, head)

    def _build_random(self) -> nn.Module:
        """BLIP's ViT-L/16 and BERT-base with cross-attention (ImageReward's published shapes,
        :mod:`marble_pl.architectures`) and the MLP head, random weights; a character-level
        BERT tokenizer with ``[DEC]``/``[ENC]`` stands in for bert-base-uncased."""
        from transformers import (
            BertTokenizer,
            BlipTextConfig,
            BlipTextModel,
            BlipVisionConfig,
            BlipVisionModel,
        )

        from marble_pl.architectures import IMAGEREWARD_TEXT, IMAGEREWARD_VISION
        from marble_pl.random_weights import random_module

        chars = "abcdefghijklmnopqrstuvwxyz0123456789"
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
        tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.tokenizer = tokenizer
        vision_cfg = BlipVisionConfig(**IMAGEREWARD_VISION)
        text_cfg = BlipTextConfig(
            **IMAGEREWARD_TEXT,
            bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
            is_decoder=True,
        )
        vision = random_module(lambda: BlipVisionModel(vision_cfg), self.torch_dtype)
        text = random_module(
            lambda: BlipTextModel(text_cfg, add_pooling_layer=False), self.torch_dtype
        )
        head = random_module(lambda: PreferenceMLP(int(text_cfg.hidden_size)), torch.float32)
        size = int(vision_cfg.image_size)
        self.transform = blip_transform(size)
        return ImageRewardScorer(vision, text, head)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The authors' normalised reward of each image for its prompt."""
        scorer = self.scorer
        assert scorer is not None and self.tokenizer is not None and self.transform is not None
        text = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        pixels = self.transform(images).to(module_dtype(scorer.vision))
        return scorer(
            pixels,
            text["input_ids"].to(images.device),
            text["attention_mask"].to(images.device),
        )

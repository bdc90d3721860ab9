"""``marble preflight --config <FLUX config>``: the per-GPU memory table of
:mod:`marble_pl.flux.memory` for the config's settings (nothing is run: a 12 B model does not
fit a CPU box, and the table is what decides between DDP and a sharded strategy)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from marble_pl.flux.memory import FluxMemoryReport, flux_memory

__all__ = ["flux_preflight", "reward_rows"]

_CLIP_REWARDS = {  # reward name -> (hub id of its CLIP, the part it keeps)
    "pickscore": ("yuvalkirstain/PickScore_v1", "CLIPModel"),
    "hpsv2": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "CLIPModel"),
    "clip_score": ("openai/clip-vit-large-patch14", "CLIPModel"),
    "aesthetic": ("openai/clip-vit-large-patch14", "CLIPVisionModelWithProjection"),
}


def _name(spec: Any) -> str:
    return spec if isinstance(spec, str) else str((spec or {}).get("name", ""))


def reward_rows(specs: Sequence[Any]) -> tuple[dict[str, tuple[str, int, int]], list[str]]:
    """The CLIP- and BLIP-based rewards' models counted on the meta device (``name -> (class,
    parameters, bytes)`` in the spec's ``dtype``), and the names of those not counted."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import (
        BlipTextConfig,
        BlipTextModel,
        BlipVisionConfig,
        BlipVisionModel,
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from marble_pl.architectures import IMAGEREWARD_TEXT, IMAGEREWARD_VISION, shipped_clip_config
    from marble_pl.models import TORCH_DTYPES

    rows, missing = {}, []
    for spec in specs:
        name = _name(spec)
        if name not in (*_CLIP_REWARDS, "imagereward"):
            missing.append(name or str(spec))
            continue
        with init_empty_weights(include_buffers=False):
            if name == "imagereward":  # BLIP's ViT-L and BERT-base with cross-attention
                part = "BlipVisionModel + BlipTextModel"
                model = nn.ModuleList(
                    [
                        BlipVisionModel(BlipVisionConfig(**IMAGEREWARD_VISION)),
                        BlipTextModel(BlipTextConfig(**IMAGEREWARD_TEXT)),
                    ]
                )
            elif _CLIP_REWARDS[name][1] == "CLIPModel":
                part = "CLIPModel"
                model = CLIPModel(CLIPConfig(**shipped_clip_config(_CLIP_REWARDS[name][0])))
            else:
                part = "CLIPVisionModelWithProjection"
                config = CLIPConfig(**shipped_clip_config(_CLIP_REWARDS[name][0]))
                vision = CLIPVisionConfig(
                    **{**config.vision_config.to_dict(), "projection_dim": config.projection_dim}
                )
                model = CLIPVisionModelWithProjection(vision)
        dtype = TORCH_DTYPES[
            str(spec.get("dtype", "float32")) if isinstance(spec, dict) else "float32"
        ]
        params = sum(p.numel() for p in model.parameters())
        rows[f"reward: {name}"] = (part, params, params * torch.finfo(dtype).bits // 8)
    return rows, missing


def _is_setting(arg: str) -> bool:
    """``--model.x=1``, ``--data.y=2``: a config override (not a flag such as --random-weights)."""
    return arg.startswith(("--model.", "--data.", "--trainer.")) and "=" in arg


def flux_preflight(
    config: str | os.PathLike[str], overrides: Sequence[str] = (), gpu_gib: float | None = None
) -> FluxMemoryReport | None:
    """The FLUX memory table of a ``marble fit`` config, or None when its model is not FLUX."""
    from omegaconf import OmegaConf

    from marble_pl.flux.components import flux_configs
    from marble_pl.flux.tiny import tiny_flux_configs
    from marble_pl.models import TORCH_DTYPES, ModelLoadError
    from marble_pl.policies.base import policy_class
    from marble_pl.policies.flux import FluxPolicy
    from marble_pl.preflight import _configured, _defaults, _timesteps

    raw = yaml.safe_load(Path(config).read_text()) or {}
    merged = OmegaConf.merge(
        OmegaConf.create(raw),
        OmegaConf.from_dotlist([a.removeprefix("--") for a in overrides if _is_setting(a)]),
    )
    path = OmegaConf.select(merged, "model.pretrained_model_name_or_path")
    if path is None:
        return None
    path = str(path)
    if policy_class(path, OmegaConf.select(merged, "model.family")) is not FluxPolicy:
        return None
    try:
        configs, _ = flux_configs(path)
    except ModelLoadError:
        if not OmegaConf.select(merged, "model.build_tiny_if_missing"):
            raise
        configs = tiny_flux_configs()  # configs/tiny_flux.yaml before its first run
    model, data = (
        OmegaConf.to_container(merged[k], resolve=True) if k in merged else {}
        for k in ("model", "data")
    )
    defaults = _defaults()
    settings = _configured({"model": model, "data": data})
    pairs_total = (
        settings["batch_size"]
        * settings["group_size"]
        * _timesteps(settings["timesteps_per_image"], settings["num_inference_steps"])
    )
    micro = model.get("micro_batch_size", defaults.get("micro_batch_size")) or pairs_total
    images = settings["batch_size"] * settings["group_size"]
    chunk = model.get("rollout_chunk_size", defaults.get("rollout_chunk_size"))  # images

    def get(key: str) -> Any:
        return model.get(key, defaults.get(key))

    rewards, missing = reward_rows(get("rewards") or [])
    report = flux_memory(
        configs,
        resolution=int(settings["resolution"]),
        max_sequence_length=int(settings["max_sequence_length"]),
        lora_rank=int(get("lora_rank")),
        lora_targets=list(get("lora_target_modules")),
        pairs_per_micro_batch=min(int(micro), pairs_total),
        images_per_rollout=min(chunk or images, images),
        prompts_per_step=settings["batch_size"],
        dtype=TORCH_DTYPES[get("weights_dtype")],
        gradient_checkpointing=bool(get("gradient_checkpointing")),
        gramian_taps=get("gradient_space") == "gramian",
        eval_ema=get("eval_ema_decay") is not None,
        extra_resident=rewards,
        **({} if gpu_gib is None else {"gpu_bytes": int(gpu_gib * 1024**3)}),
    )
    report.settings["rewards_not_counted"] = missing
    return report

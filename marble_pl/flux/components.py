"""A FLUX pipeline's parts: loaded with each class's ``from_pretrained``, or built at their REAL
architecture with random weights (nothing downloaded), as :mod:`marble_pl.random_weights` does
for SD3: configs from a local directory, else the Hugging Face cache, else the shipped ones
(:mod:`marble_pl.flux.architecture`); parameters on the meta device, then drawn in the dtype.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from marble_pl.errors import ConfigError
from marble_pl.flux.architecture import FLUX_DEV, FLUX_PIPELINE, shipped_flux_configs
from marble_pl.models import (
    ModelLoadError,
    env_offline,
    looks_like_local_path,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)
from marble_pl.random_weights import (
    ConfigSources,
    apply_overrides,
    random_module,
    read_configs,
)

__all__ = [
    "FluxComponents",
    "RandomFlux",
    "build_random_flux",
    "check_flux_architecture",
    "flux_configs",
    "is_flux",
    "load_flux",
]

_CONFIG_FILES = {
    "transformer": "transformer/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
_SOURCES = ConfigSources(
    files=_CONFIG_FILES,
    optional=(),
    shipped=shipped_flux_configs,
    shipped_ids=FLUX_DEV,
    shipped_from="marble_pl.flux.architecture",
    local_files=f"config files ({', '.join(_CONFIG_FILES.values())})",
)
_MIN_VOCAB = 1000  # fewer tokens: not the model's tokenizer (transformers builds empty ones)


@dataclass
class FluxComponents:
    """The modules and tokenizers of a ``FluxPipeline``, held separately (the pipeline is not an
    ``nn.Module``; a Lightning module keeps these as attributes so that they move to the device).
    """

    transformer: Any  # FluxTransformer2DModel
    vae: Any  # AutoencoderKL
    text_encoder: Any  # CLIPTextModel: the pooled output only
    text_encoder_2: Any  # T5EncoderModel: the token sequence
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any  # FlowMatchEulerDiscreteScheduler, dynamic shifting

    @property
    def vae_scale_factor(self) -> int:
        """Pixel size of one latent cell, as ``FluxPipeline`` computes it."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self) -> Any:
        """A ``FluxPipeline`` over these very modules (no copy)."""
        from diffusers import FluxPipeline

        return FluxPipeline(
            scheduler=self.scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=self.transformer,
        )

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        *,
        device: torch.device | str | None = None,
        max_sequence_length: int = 512,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(T5 sequence [N, L, 4096], CLIP pooled [N, 768], txt_ids [L, 3])`` via
        ``FluxPipeline.encode_prompt`` (FLUX.1-dev has no negative prompt: no CFG)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts() got an empty prompt list.")
        device = torch.device(device) if device is not None else self.text_encoder.device
        embeds, pooled, text_ids = self.pipeline().encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return embeds, pooled, text_ids


@dataclass
class RandomFlux:
    """A randomly initialised FLUX pipeline and where its architecture came from."""

    components: FluxComponents
    config_source: str
    tokenizer_source: str


def flux_configs(
    pretrained_model_name_or_path: str | os.PathLike[str], revision: str | None = None
) -> tuple[dict[str, dict[str, Any]], str]:
    """``component -> config`` of a FLUX pipeline read without any download, and the source."""
    return read_configs(pretrained_model_name_or_path, revision, _SOURCES)


def is_flux(pretrained_model_name_or_path: str | os.PathLike[str]) -> bool:
    """Whether a hub id or directory names a ``FluxPipeline`` (read from its model_index.json,
    locally or in the cache; a shipped hub id counts), without any download."""
    name = os.fspath(pretrained_model_name_or_path)
    if shipped_flux_configs(name) is not None:
        return True
    if looks_like_local_path(name):
        index = Path(name).expanduser() / "model_index.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(name, "model_index.json", local_files_only=True))
        except Exception:  # not cached, or not a repo id
            return False
    try:
        return json.loads(index.read_text()).get("_class_name") == FLUX_PIPELINE
    except (OSError, ValueError):
        return False


def check_flux_architecture(configs: Mapping[str, Mapping[str, Any]]) -> None:
    """The components must fit together; one ``ConfigError`` line naming both sides if not.

    FLUX packs 2x2 latent cells (``in_channels`` = 4 x the VAE's ``latent_channels``), reads
    T5's sequence (``joint_attention_dim`` = T5's ``d_model``) and CLIP's pooled output
    (``pooled_projection_dim`` = CLIP's ``hidden_size``: CLIPTextModel has no projection).
    """
    t, vae = configs["transformer"], configs["vae"]
    clip, t5 = configs["text_encoder"], configs["text_encoder_2"]
    pairs = [
        ("transformer.in_channels", t.get("in_channels"), "4 x vae.latent_channels",
         4 * int(vae.get("latent_channels", 0))),
        ("transformer.joint_attention_dim", t.get("joint_attention_dim"),
         "text_encoder_2.d_model", t5.get("d_model")),
        ("transformer.pooled_projection_dim", t.get("pooled_projection_dim"),
         "text_encoder.hidden_size", clip.get("hidden_size")),
        ("sum(transformer.axes_dims_rope)", sum(t.get("axes_dims_rope", [])),
         "transformer.attention_head_dim", t.get("attention_head_dim")),
    ]  # fmt: skip
    for left, a, right, b in pairs:
        if a != b:
            raise ConfigError(
                f"the FLUX components do not fit together: {left} is {a} but {right} is {b}; "
                "fix the config.json (or model.architecture_overrides) of one of them"
            )


def _tokenizers(name: str, revision: str | None) -> tuple[Any, Any, str]:
    """The model's own tokenizers from local files or the cache, else byte-level ones."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    common = {"local_files_only": True, "revision": revision}
    try:
        t1 = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
        t2 = T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_2", **common)
        if min(len(t1), len(t2)) < _MIN_VOCAB:
            raise OSError("tokenizer files not found")
        return t1, t2, "pretrained"
    except (OSError, ValueError):
        return tiny_clip_tokenizer(), tiny_t5_tokenizer(), "byte-level"


def t5_encoder(config: Mapping[str, Any]) -> Any:
    """A ``T5EncoderModel`` of ``config`` whose input embedding is its one token table."""
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config.from_dict(dict(config)))
    model.set_input_embeddings(model.shared)
    return model


def build_flux_modules(
    configs: Mapping[str, Mapping[str, Any]], build: Callable[[str, Callable[[], Any]], Any]
) -> dict[str, Any]:
    """Each FLUX module of ``configs`` made by ``build(component, constructor)`` (random weights,
    the meta device ...), and the scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return {
        "transformer": build(
            "transformer", lambda: FluxTransformer2DModel.from_config(configs["transformer"])
        ),
        "vae": build("vae", lambda: AutoencoderKL.from_config(configs["vae"])),
        "text_encoder": build(
            "text_encoder",
            lambda: CLIPTextModel(CLIPTextConfig.from_dict(dict(configs["text_encoder"]))),
        ),
        "text_encoder_2": build("text_encoder_2", lambda: t5_encoder(configs["text_encoder_2"])),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
    }


def build_random_flux(
    pretrained_model_name_or_path: str | os.PathLike[str] = FLUX_DEV,
    *,
    dtype: torch.dtype = torch.float32,
    architecture_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> RandomFlux:
    """Every FLUX component at its real architecture (see :func:`flux_configs`), random weights
    drawn directly in ``dtype`` (the 12 B transformer never exists in float32).

    ``architecture_overrides`` changes config entries per component, e.g. fewer blocks:
    ``{"transformer": {"num_layers": 1, "num_single_layers": 1}}``.
    """
    name = os.fspath(pretrained_model_name_or_path)
    configs, source = flux_configs(name, revision)
    apply_overrides(configs, architecture_overrides, _CONFIG_FILES, family="FLUX ")
    check_flux_architecture(configs)
    seeds = {k: seed + i for i, k in enumerate(_CONFIG_FILES)}
    parts = build_flux_modules(configs, lambda k, make: random_module(make, dtype, seeds[k]))
    tokenizer, tokenizer_2, tokenizer_source = _tokenizers(name, revision)
    return RandomFlux(
        FluxComponents(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2),
        source,
        tokenizer_source,
    )


def load_flux(
    pretrained_model_name_or_path: str | os.PathLike[str],
    *,
    local_files_only: bool = False,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> FluxComponents:
    """Load every FLUX component with its class's ``from_pretrained(path, subfolder=...)``;
    missing weights raise ``ModelLoadError`` with the fix."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from huggingface_hub.errors import HFValidationError
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    name = os.fspath(pretrained_model_name_or_path)
    if looks_like_local_path(name):
        name = str(Path(name).expanduser())
    common: dict[str, Any] = {
        "local_files_only": bool(local_files_only) or env_offline(),
        "revision": revision,
    }
    try:
        with warnings.catch_warnings():  # diffusers passes a deprecated hub argument
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return FluxComponents(
                transformer=FluxTransformer2DModel.from_pretrained(
                    name, subfolder="transformer", torch_dtype=dtype, **common
                ),
                vae=AutoencoderKL.from_pretrained(
                    name, subfolder="vae", torch_dtype=dtype, **common
                ),
                text_encoder=CLIPTextModel.from_pretrained(
                    name, subfolder="text_encoder", dtype=dtype, **common
                ),
                text_encoder_2=T5EncoderModel.from_pretrained(
                    name, subfolder="text_encoder_2", dtype=dtype, **common
                ),
                tokenizer=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common),
                tokenizer_2=T5TokenizerFast.from_pretrained(
                    name, subfolder="tokenizer_2", **common
                ),
                scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
                    name, subfolder="scheduler", **common
                ),
            )
    except (OSError, HFValidationError) as err:
        raise ModelLoadError(
            f"Could not load the FLUX pipeline {name!r}: {type(err).__name__}: "
            f"{str(err).rstrip('.')}. Fix: pass a local `save_pretrained` directory, or on a "
            f"machine with network run `hf download {name}` (gated: accept the licence and log "
            "in first) and point HF_HOME at that cache."
        ) from err

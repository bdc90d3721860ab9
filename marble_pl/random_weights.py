"""SD3 pipelines at their REAL architecture with random weights, downloading nothing.

The configs come from a local directory's (or the Hugging Face cache's) ``config.json`` files
when present, else from :mod:`marble_pl.architectures` (the published configs, as facts).
Parameters are created on the meta device (accelerate's ``init_empty_weights``) and then drawn
once, directly in the target dtype, so a 2.5 B-parameter transformer never exists in float32.
Used by ``model.random_weights`` (``marble fit``) and ``marble preflight``: shapes, module names,
dtypes, memory and time are real; the outputs are noise.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marble_pl.architectures import SD35_MEDIUM, shipped_sd3_configs
from marble_pl.errors import ConfigError
from marble_pl.models import (
    ModelLoadError,
    SD3Components,
    looks_like_local_path,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)

__all__ = [
    "ConfigSources",
    "RandomSD3",
    "apply_overrides",
    "build_random_sd3",
    "check_sd3_architecture",
    "collect_configs",
    "random_module",
    "random_weights_resolution_multiple",
    "read_configs",
    "read_cached_configs",
    "read_local_configs",
    "sd3_configs",
]

_CONFIG_FILES = {
    "transformer": "transformer/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "text_encoder_3": "text_encoder_3/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
_OPTIONAL = {"text_encoder_3"}
_MIN_VOCAB = 1000  # fewer tokens: not the model's tokenizer


@dataclass
class RandomSD3:
    """A randomly initialised SD3 pipeline and where its architecture came from."""

    components: SD3Components
    config_source: str
    """``local directory``, ``Hugging Face cache`` or ``shipped (marble_pl.architectures)``."""
    tokenizer_source: str
    """``pretrained`` (the model's own files) or ``byte-level`` (no tokenizer files found)."""


def collect_configs(
    locate: Callable[[str], Path | None],
    files: Mapping[str, str] = _CONFIG_FILES,
    optional: Collection[str] = _OPTIONAL,
) -> dict[str, dict[str, Any]] | None:
    """``component -> config`` of each of ``files`` (component -> relative path) that ``locate``
    finds; None unless all but the ``optional`` ones are there."""
    found = {}
    for name, rel in files.items():
        file = locate(rel)
        if file is not None:
            found[name] = json.loads(file.read_text())
    return found if set(files) - set(optional) <= set(found) else None


def read_local_configs(
    root: Path, files: Mapping[str, str] = _CONFIG_FILES, optional: Collection[str] = _OPTIONAL
) -> dict[str, dict[str, Any]] | None:
    """:func:`collect_configs` from the files under the directory ``root``."""
    return collect_configs(
        lambda rel: root / rel if (root / rel).is_file() else None, files, optional
    )


def read_cached_configs(
    repo_id: str,
    revision: str | None,
    files: Mapping[str, str] = _CONFIG_FILES,
    optional: Collection[str] = _OPTIONAL,
) -> dict[str, dict[str, Any]] | None:
    """:func:`collect_configs` from the Hugging Face cache only (``local_files_only``)."""
    from huggingface_hub import hf_hub_download

    def cached(rel: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, rel, revision=revision, local_files_only=True))
        except Exception:  # not cached (or not a valid repo id): this file is absent
            return None

    return collect_configs(cached, files, optional)


@dataclass(frozen=True)
class ConfigSources:
    """Where a model family's component configs are read from, without any download."""

    files: Mapping[str, str]
    """component -> its config file's path inside the pipeline folder"""
    optional: Collection[str]
    shipped: Callable[[str], dict[str, dict[str, Any]] | None]
    """hub id -> a copy of the configs shipped with marble-pl, or None"""
    shipped_ids: str
    shipped_from: str
    """the module holding the shipped configs (said as the source)"""
    local_files: str
    """what a local directory must hold, for the error"""


_SD3_SOURCES = ConfigSources(
    files=_CONFIG_FILES,
    optional=_OPTIONAL,
    shipped=shipped_sd3_configs,
    shipped_ids=SD35_MEDIUM,
    shipped_from="marble_pl.architectures",
    local_files="config.json files (transformer/, vae/, text_encoder/, text_encoder_2/, "
    "scheduler/)",
)


def read_configs(
    pretrained_model_name_or_path: str | os.PathLike[str],
    revision: str | None,
    sources: ConfigSources,
) -> tuple[dict[str, dict[str, Any]], str]:
    """``component -> config`` read without any download, and the source: a local directory's
    config files, else the Hugging Face cache's, else those shipped for known hub ids."""
    name = os.fspath(pretrained_model_name_or_path)
    if looks_like_local_path(name):
        configs = read_local_configs(Path(name).expanduser(), sources.files, sources.optional)
        if configs is None:
            raise ModelLoadError(
                f"cannot build {name!r} with random weights: the directory lacks the components' "
                f"{sources.local_files}"
            )
        return configs, "local directory"
    configs = read_cached_configs(name, revision, sources.files, sources.optional)
    if configs is not None:
        return configs, "Hugging Face cache"
    configs = sources.shipped(name)
    if configs is None:
        raise ModelLoadError(
            f"cannot build {name!r} with random weights: its configs are neither cached nor "
            f"shipped with marble-pl (shipped: {sources.shipped_ids}); pass a local directory "
            "holding the components' config.json files"
        )
    return configs, f"shipped ({sources.shipped_from})"


def sd3_configs(
    pretrained_model_name_or_path: str | os.PathLike[str], revision: str | None = None
) -> tuple[dict[str, dict[str, Any]], str]:
    """``component -> config`` of an SD3 pipeline, read without any download, and the source.

    A local directory's ``config.json`` files first, then the Hugging Face cache's, then the
    configs shipped for known hub ids (:data:`~marble_pl.architectures.SD35_MEDIUM`).
    """
    return read_configs(pretrained_model_name_or_path, revision, _SD3_SOURCES)


def _fan_in(shape: torch.Size) -> int:
    return int(math.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


def _draw(name: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Biases 0, norm scales 1, other weights N(0, min(0.02, 1/sqrt(fan_in))^2)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or len(shape) == 0:
        return torch.zeros(shape, dtype=dtype)
    if leaf == "weight" and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    std = min(0.02, 1.0 / math.sqrt(max(_fan_in(shape), 1)))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)


def random_module(build: Callable[[], nn.Module], dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """``build()`` with its parameters on the meta device, then drawn once in ``dtype``.

    Buffers are built for real (positional tables, ids); tied parameters stay tied.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = build()
    gen = torch.Generator().manual_seed(seed)
    made: dict[int, nn.Parameter] = {}
    for prefix, sub in module.named_modules():
        for leaf, param in list(sub._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                value = _draw(f"{prefix}.{leaf}", param.shape, dtype, gen)
                made[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            sub._parameters[leaf] = made[id(param)]
    for sub in module.modules():
        for leaf, buf in sub._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                sub._buffers[leaf] = buf.to(dtype)
    return module


def apply_overrides(
    configs: dict[str, dict[str, Any]],
    overrides: Mapping[str, Mapping[str, Any]] | None,
    components: Collection[str] = _CONFIG_FILES,
    family: str = "",
) -> None:
    """Update ``configs`` in place with ``model.architecture_overrides``; a one-line
    ``ConfigError`` for a component not among the family's ``components``, or not in this model."""
    for component, values in (overrides or {}).items():
        if component not in components:
            raise ConfigError(
                f"model.architecture_overrides: unknown {family}component {component!r}; one of "
                f"{sorted(components)}"
            )
        if component not in configs:
            raise ConfigError(
                f"model.architecture_overrides: {component!r} is not part of this model"
            )
        configs[component].update(dict(values))


def _tokenizers(name: str, revision: str | None, with_t5: bool) -> tuple[Any, Any, Any, str]:
    """The model's own tokenizers from local files or the cache, else byte-level ones."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    common = {"local_files_only": True, "revision": revision}
    try:
        t1 = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
        t2 = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **common)
        t3 = (
            T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_3", **common)
            if with_t5
            else None
        )
        # transformers builds an EMPTY tokenizer (2 tokens) when the files are missing.
        if min(len(t) for t in (t1, t2, t3) if t is not None) < _MIN_VOCAB:
            raise OSError("tokenizer files not found")
        return t1, t2, t3, "pretrained"
    except (OSError, ValueError):
        t3 = tiny_t5_tokenizer() if with_t5 else None
        return tiny_clip_tokenizer(), tiny_clip_tokenizer(), t3, "byte-level"


def check_sd3_architecture(configs: Mapping[str, Mapping[str, Any]]) -> None:
    """The components must fit together; one ``ConfigError`` line naming both sides if not.

    SD3 concatenates the two CLIP encoders' hidden states (zero-padded to the T5 width, which is
    the transformer's ``joint_attention_dim``) and their pooled projections
    (``pooled_projection_dim``), and denoises the VAE's latents (``in_channels``).
    """
    t, vae = configs["transformer"], configs["vae"]
    clip_l, clip_g = configs["text_encoder"], configs["text_encoder_2"]
    joint = t.get("joint_attention_dim")
    pooled = clip_l.get("projection_dim", 0) + clip_g.get("projection_dim", 0)
    width = clip_l.get("hidden_size", 0) + clip_g.get("hidden_size", 0)
    problems = []
    if vae.get("latent_channels") != t.get("in_channels"):
        problems.append(
            f"vae.latent_channels is {vae.get('latent_channels')} but transformer.in_channels "
            f"is {t.get('in_channels')}"
        )
    if pooled != t.get("pooled_projection_dim"):
        problems.append(
            f"the CLIP encoders' projection_dim add up to {pooled} but "
            f"transformer.pooled_projection_dim is {t.get('pooled_projection_dim')}"
        )
    if joint is None or width > joint:
        problems.append(
            f"the CLIP encoders' hidden_size add up to {width}, more than "
            f"transformer.joint_attention_dim {joint}"
        )
    t5 = configs.get("text_encoder_3")
    if t5 is not None and t5.get("d_model") != joint:
        problems.append(
            f"text_encoder_3.d_model is {t5.get('d_model')} but "
            f"transformer.joint_attention_dim is {joint}"
        )
    if problems:
        raise ConfigError(
            f"the SD3 components do not fit together: {problems[0]}; fix the config.json (or "
            "model.architecture_overrides) of one of them"
        )


def build_random_sd3(
    pretrained_model_name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    load_t5: bool = True,
    architecture_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> RandomSD3:
    """Every SD3 component at its real architecture (see :func:`sd3_configs`), random weights.

    ``architecture_overrides`` changes config entries per component, e.g. fewer layers:
    ``{"transformer": {"num_layers": 2, "dual_attention_layers": [0]}}``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    name = os.fspath(pretrained_model_name_or_path)
    configs, source = sd3_configs(name, revision)
    apply_overrides(configs, architecture_overrides)
    check_sd3_architecture(configs)
    with_t5 = load_t5 and "text_encoder_3" in configs

    def text(key: str) -> CLIPTextModelWithProjection:
        config = CLIPTextConfig.from_dict(configs[key])
        return CLIPTextModelWithProjection(config)

    parts: dict[str, Any] = {
        "transformer": random_module(
            lambda: SD3Transformer2DModel.from_config(configs["transformer"]), dtype, seed
        ),
        "vae": random_module(lambda: AutoencoderKL.from_config(configs["vae"]), dtype, seed + 1),
        "text_encoder": random_module(lambda: text("text_encoder"), dtype, seed + 2),
        "text_encoder_2": random_module(lambda: text("text_encoder_2"), dtype, seed + 3),
        "text_encoder_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
    }
    if with_t5:
        t5 = T5Config.from_dict(configs["text_encoder_3"])

        def t5_encoder() -> T5EncoderModel:
            model = T5EncoderModel(t5)
            model.set_input_embeddings(model.shared)  # one token table, as in the checkpoint
            return model

        parts["text_encoder_3"] = random_module(t5_encoder, dtype, seed + 4)
    t1, t2, t3, tokenizer_source = _tokenizers(name, revision, with_t5)
    parts.update(tokenizer=t1, tokenizer_2=t2, tokenizer_3=t3)
    return RandomSD3(SD3Components(**parts), source, tokenizer_source)


def random_weights_resolution_multiple(
    pretrained_model_name_or_path: str | os.PathLike[str],
    architecture_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[int, int, int] | None:
    """``(multiple, vae_scale_factor, patch_size)`` of the architecture ``random_weights``
    builds (see :func:`~marble_pl.checks.resolution_multiple`); None if it cannot be read."""
    try:
        configs, _ = sd3_configs(pretrained_model_name_or_path)
        apply_overrides(configs, architecture_overrides)
        patch_size = int(configs["transformer"]["patch_size"])
        vae_scale_factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    except (ModelLoadError, KeyError, TypeError, ValueError):
        return None
    return vae_scale_factor * patch_size, vae_scale_factor, patch_size

"""The policy interface: a model family (SD3, FLUX, ...) as the training algorithm sees it.

:class:`~marble_pl.module.MarbleModule` is the algorithm (rollout, rewards, balance, update); it
never names a model family. It builds a :class:`Policy` with :func:`build_policy`, which picks
the class registered for the pipeline's ``model_index.json`` ``_class_name``
(:func:`register_policy`), and talks to the model only through it.

What a new family implements (a subclass of :class:`Policy`, decorated with
``@register_policy("<PipelineClassName>")`` and imported in :mod:`marble_pl.policies`):

* :meth:`Policy.load`: load the pipeline's parts (``model.random_weights``: build them at real
  shape with random weights), freeze what is not trained, and call
  :meth:`Policy.attach_adapters` on the denoiser; set :attr:`Policy.transformer` (the denoiser
  carrying the LoRA adapters), :attr:`Policy.scheduler` and :attr:`Policy.lora_params`.
* :meth:`Policy.modules`: the ``nn.Module`` parts by attribute name; the module registers
  them under those names (so Lightning moves them to the device and the LoRA's state-dict
  keys read ``transformer.<...>.lora_A.default.weight``).
* :meth:`Policy.encode`: the frozen text encoders' conditioning of a list of prompts, a tuple
  of tensors with the batch first (indexed per image by the training pairs).
* :meth:`Policy.sample`: roll out one image per prompt with the given adapter and
  :class:`~marble_pl.rollout.RolloutConfig`, decoded by the VAE, as a
  :class:`~marble_pl.rollout.RolloutOutput` (clean latents, images in [0, 1], conditioning).
* :meth:`Policy.velocity`: ``v(x_t, t | conditioning)`` in float32 with the active adapter, on
  the latents as :meth:`sample` returns them and ``t`` in [0, 1] (``x_t = (1 - t) x0 + t eps``).
* :meth:`Policy.latent_shape` and :meth:`Policy.schedule_sigmas`: the shape of one image's
  latents, and the sampler's shifted timesteps (what the training timesteps are drawn from).

Optional: :meth:`Policy.resolution_sizes` (check ``model.resolution`` from the configs before
loading), :meth:`Policy.build_tiny` (``model.build_tiny_if_missing``), :meth:`Policy.claims`
(choose this family for a name with no readable ``model_index.json``), :meth:`Policy.condition`
(the conditioning a rollout was sampled with). The adapters (trained ``default``, sampling
``old``, evaluation ``ema``; the reference is the base model, adapters off), their EMA update
and the checkpoint's LoRA keys are implemented here, on peft's LoRA, for every family.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from marble_pl.models import (
    DEFAULT_ADAPTER,
    EVAL_ADAPTER,
    SAMPLING_ADAPTER,
    add_lora,
    add_sampling_adapter,
    ema_update_adapter,
    is_lora_key,
    lora_init_weights,
    use_adapter,
)
from marble_pl.rollout import RolloutConfig, RolloutOutput

__all__ = [
    "DEFAULT_PIPELINE",
    "Conditioning",
    "Policy",
    "build_policy",
    "pipeline_class_name",
    "policy_class",
    "register_policy",
]

Conditioning = tuple[Tensor, ...]
"""A batch's text conditioning: tensors with the batch first (e.g. ``(embeds, pooled)``)."""

DEFAULT_PIPELINE = "StableDiffusion3Pipeline"
"""The family of a name whose ``model_index.json`` cannot be read and no family claims (and of
a pipeline class no family registered: the behaviour before families were classes)."""

_REGISTRY: dict[str, type[Policy]] = {}
P = TypeVar("P", bound="type[Policy]")


class Policy(ABC):
    """A model family's denoiser with its LoRA adapters, text encoders, VAE and sampler.

    ``hparams`` are the module's hyperparameters (``pretrained_model_name_or_path``,
    ``local_files_only``, ``load_t5``, ``weights_dtype``, ``gradient_checkpointing``, the
    ``lora_*`` settings, ``max_sequence_length``, ``random_weights``,
    ``architecture_overrides``, ``resolution``, ``eval_ema_decay``, ``seed``).
    """

    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    transformer: nn.Module
    scheduler: Any
    lora_params: list[nn.Parameter]

    def __init__(self, hparams: Mapping[str, Any]) -> None:
        self.hparams = hparams

    # ------------------------------------------------------------------ what a family implements

    @abstractmethod
    def load(self) -> None:
        """Load (or build at random) the parts, freeze them, attach the adapters."""

    @abstractmethod
    def modules(self) -> dict[str, nn.Module | None]:
        """The ``nn.Module`` parts by attribute name (the denoiser as ``transformer``)."""

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """The frozen text encoders' conditioning of ``prompts``, batch first."""

    @abstractmethod
    def sample(
        self,
        prompts: Sequence[str],
        generator: torch.Generator | list[torch.Generator],
        adapter: str | None,
        noise: Tensor | None,
        config: RolloutConfig,
    ) -> RolloutOutput:
        """Roll out one image per prompt with ``adapter`` (no grad), decoded by the VAE."""

    @abstractmethod
    def velocity(self, x_t: Tensor, t: Tensor, *cond: Tensor) -> Tensor:
        """``v(x_t, t)`` in float32 with whichever adapter is active (``t`` in [0, 1])."""

    @abstractmethod
    def latent_shape(self, config: RolloutConfig) -> tuple[int, ...]:
        """One image's latent shape at ``config``'s resolution (checked against the model)."""

    @abstractmethod
    def schedule_sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> Tensor:
        """The sampler's ``num_steps`` shifted timesteps in (0, 1] for such latents (CPU)."""

    # ------------------------------------------------------------------ optional hooks

    @classmethod
    def claims(cls, name: str) -> bool:
        """Whether a name with no readable ``model_index.json`` is of this family."""
        return False

    def resolution_sizes(self) -> tuple[int, int, int] | None:
        """``(multiple, vae_scale_factor, patch_size)`` from the configs before loading, or
        None when they cannot be read (checked after loading instead)."""
        return None

    def build_tiny(self, path: str) -> None:
        """Build a tiny random pipeline at ``path`` if it holds none (``build_tiny_if_missing``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot build a tiny pipeline")

    def build_tiny_once(self, path: str, trainer: Any) -> None:
        """:meth:`build_tiny` on global rank 0 while the other ranks wait at a barrier (ranks
        racing to build, or loading a folder still being written, would load a half-built one)."""
        if trainer is None or trainer.world_size == 1:
            self.build_tiny(path)
            return
        if trainer.is_global_zero:
            self.build_tiny(path)
        trainer.strategy.barrier("marble_ensure_tiny_model")

    def condition(self, out: RolloutOutput) -> Conditioning:
        """The conditioning a rollout was sampled with (what the training pairs see)."""
        return (out.prompt_embeds, out.pooled_prompt_embeds)

    def frozen_modules(self) -> list[nn.Module]:
        """The parts kept in eval mode whatever Lightning asks (all but the denoiser)."""
        return [m for k, m in self.modules().items() if m is not None and k != "transformer"]

    # ------------------------------------------------------------------ adapters, for every family

    @property
    def device(self) -> torch.device:
        """Where the denoiser's weights are."""
        return next(self.transformer.parameters()).device

    def attach_adapters(self, transformer: nn.Module) -> list[nn.Parameter]:
        """The trained LoRA (``default``), its sampling copy (``old``) and, with
        ``eval_ema_decay``, the evaluation EMA (``ema``); returns the trained parameters."""
        hp = self.hparams
        params = add_lora(
            transformer,
            rank=hp["lora_rank"],
            alpha=hp["lora_alpha"],
            target_modules=list(hp["lora_target_modules"]),
            init_lora_weights=lora_init_weights(hp["lora_init"]),
        )
        add_sampling_adapter(transformer)  # every adapter float32 whatever the base dtype
        if hp["eval_ema_decay"] is not None:
            add_sampling_adapter(transformer, dst=EVAL_ADAPTER)
        return params

    def use_adapter(self, name: str | None) -> AbstractContextManager[None]:
        """Forwards inside the block use adapter ``name`` (None: the reference base model)."""
        return use_adapter(self.transformer, name)

    @property
    def sampling_adapter(self) -> str:
        """The adapter rollouts sample with: DiffusionNFT's ``v_old``."""
        return SAMPLING_ADAPTER

    @property
    def eval_adapter(self) -> str:
        """The adapter validation and sample grids sample with (the EMA one when kept)."""
        return DEFAULT_ADAPTER if self.hparams["eval_ema_decay"] is None else EVAL_ADAPTER

    def update_adapter_averages(self, decay: float, eval_decay: float | None) -> None:
        """``v_old <- decay v_old + (1 - decay) v_theta``; the evaluation EMA with ``eval_decay``."""
        ema_update_adapter(self.transformer, decay=decay)
        if eval_decay is not None:
            ema_update_adapter(self.transformer, dst=EVAL_ADAPTER, decay=eval_decay)

    @staticmethod
    def is_lora_key(key: str) -> bool:
        """Whether a state-dict key is a LoRA tensor (what checkpoints keep)."""
        return is_lora_key(key)

    @staticmethod
    def eval_twin(key: str) -> str:
        """The trained adapter's key of an evaluation-EMA key (its start at resume)."""
        return key.replace(f".{EVAL_ADAPTER}.", f".{DEFAULT_ADAPTER}.")


def register_policy(*pipeline_classes: str) -> Callable[[P], P]:
    """Class decorator: the policy of pipelines whose ``_class_name`` is one of these."""

    def register(cls: P) -> P:
        for name in pipeline_classes:
            _REGISTRY[name] = cls
        cls.pipeline_classes = tuple(pipeline_classes)
        return cls

    return register


def pipeline_class_name(name: str) -> str | None:
    """``_class_name`` of ``name``'s ``model_index.json``: a local directory's, else the Hugging
    Face cache's (never downloaded); None when neither can be read."""
    path = Path(os.fspath(name)) / "model_index.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(os.fspath(name), "model_index.json")
        except Exception:  # not a repo id, no cache: nothing to read
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def policy_class(name: str) -> type[Policy]:
    """The registered family of pipeline ``name`` (see :data:`DEFAULT_PIPELINE`)."""
    found = pipeline_class_name(name)
    if found in _REGISTRY:
        return _REGISTRY[found]
    claimed = [cls for cls in dict.fromkeys(_REGISTRY.values()) if cls.claims(os.fspath(name))]
    return claimed[0] if claimed else _REGISTRY[DEFAULT_PIPELINE]


def build_policy(hparams: Mapping[str, Any]) -> Policy:
    """The policy of ``hparams["pretrained_model_name_or_path"]``, not loaded yet."""
    return policy_class(hparams["pretrained_model_name_or_path"])(hparams)


def registered() -> Iterator[tuple[str, type[Policy]]]:
    """``(pipeline class name, policy class)`` of every registered family."""
    return iter(sorted(_REGISTRY.items()))

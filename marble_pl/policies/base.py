"""The policy interface: a model family (SD3, FLUX, ...) as the training algorithm sees it.

:class:`~marble_pl.module.MarbleModule` is the algorithm (rollout, rewards, balance, update); it
never names a model family. It builds a :class:`Policy` with :func:`build_policy`, which picks
the family ``model.family`` names (a short name such as ``flux``, or a pipeline class), else the
class registered for the pipeline's ``model_index.json`` ``_class_name``
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

Optional: :attr:`Policy.name` (the short name ``model.family`` accepts),
:attr:`Policy.default_distilled_guidance` (a guidance input embedding's value; None: none, and
``model.distilled_guidance`` is refused), :meth:`Policy.resolution_sizes` (check ``model.resolution`` from the configs before
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

from marble_pl.errors import ConfigError
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
    "check_distilled_guidance",
    "family_class",
    "family_names",
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
    name: ClassVar[str] = ""
    """The family's short name, as ``model.family`` accepts it (``sd3``, ``flux``)."""
    default_distilled_guidance: ClassVar[float | None] = None
    """The value of the denoiser's distilled-guidance input embedding when
    ``model.distilled_guidance`` is null; None: the family has no such input."""
    module_names: ClassVar[tuple[str, ...]] = ("transformer",)
    """The attributes holding the family's ``nn.Module`` parts, the denoiser first."""
    transformer: nn.Module
    scheduler: Any
    lora_params: list[nn.Parameter]

    def __init__(self, hparams: Mapping[str, Any]) -> None:
        self.hparams = hparams

    # ------------------------------------------------------------------ what a family implements

    @abstractmethod
    def load(self) -> None:
        """Load (or build at random) the parts, freeze them, attach the adapters."""

    def modules(self) -> dict[str, nn.Module | None]:
        """The ``nn.Module`` parts by attribute name (the denoiser as ``transformer``): the
        family's :attr:`module_names` (None for one not loaded)."""
        return {name: getattr(self, name) for name in self.module_names}

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

    def prepare_training(self) -> None:
        """The end of every family's :meth:`load`: freeze the parts but the denoiser (eval
        mode), attach the LoRA adapters to it and, when asked, its gradient checkpointing."""
        for frozen in self.frozen_modules():
            frozen.requires_grad_(False).eval()
        self.lora_params = self.attach_adapters(self.transformer)
        if self.hparams["gradient_checkpointing"]:
            self.transformer.enable_gradient_checkpointing()

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


def family_names() -> dict[str, type[Policy]]:
    """Every name ``model.family`` accepts: each family's short name and its pipeline classes."""
    names: dict[str, type[Policy]] = {}
    for pipeline, cls in sorted(_REGISTRY.items()):
        names.update({cls.name: cls} if cls.name else {})
        names[pipeline] = cls
    return names


def _short_names() -> str:
    """The families' short names, for messages (``flux, sd3``)."""
    return ", ".join(sorted({cls.name for cls in _REGISTRY.values() if cls.name}))


def family_class(family: str) -> type[Policy]:
    """The family ``model.family`` names (a short name or a pipeline class, any case)."""
    names = family_names()
    lowered = {key.lower(): cls for key, cls in names.items()}
    if str(family).lower() in lowered:
        return lowered[str(family).lower()]
    from marble_pl.precheck import did_you_mean

    raise ConfigError(
        f"model.family {family!r} is not a model family{did_you_mean(str(family), names)}: "
        f"use one of {_short_names()} (or a pipeline class: {', '.join(sorted(_REGISTRY))}), "
        "or null to choose from the model's model_index.json"
    )


def policy_class(name: str, family: str | None = None) -> type[Policy]:
    """The family of pipeline ``name``: ``family`` when given (checked against a readable
    ``model_index.json``), else the one registered for its ``_class_name``, else the one that
    :meth:`Policy.claims` the name, else :data:`DEFAULT_PIPELINE`'s."""
    found = pipeline_class_name(name)
    if family is not None:
        cls = family_class(family)
        if found is not None and found not in cls.pipeline_classes:
            other = _REGISTRY[found].name if found in _REGISTRY else None
            fix = f"model.family: {other}" if other else "another model.family"
            raise ConfigError(
                f"model.family is {family!r} ({', '.join(cls.pipeline_classes)}) but "
                f"{os.fspath(name)}'s model_index.json says {found!r}: set {fix} or null "
                "(auto), or point model.pretrained_model_name_or_path at that family's pipeline"
            )
        return cls
    if found in _REGISTRY:
        return _REGISTRY[found]
    claimed = [cls for cls in dict.fromkeys(_REGISTRY.values()) if cls.claims(os.fspath(name))]
    cls = claimed[0] if claimed else _REGISTRY[DEFAULT_PIPELINE]
    how = "from its name" if claimed else "by default"
    _notice(
        f"model.family: no readable model_index.json at {os.fspath(name)}: {cls.name} chosen "
        f"{how}; set model.family ({_short_names()}) to choose it yourself"
    )
    return cls


_SAID: set[str] = set()


def _notice(message: str) -> None:
    """Say ``message`` once (rank zero): how an auto family was chosen without an index."""
    if message not in _SAID:
        _SAID.add(message)
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(message)


def check_distilled_guidance(cls: type[Policy], value: float | None) -> None:
    """``model.distilled_guidance`` only for a family whose denoiser has that input."""
    if value is not None and cls.default_distilled_guidance is None:
        with_one = sorted(c.name for c in _REGISTRY.values() if c.default_distilled_guidance)
        raise ConfigError(
            f"model.distilled_guidance is {value} but the {cls.name or cls.__name__} family has "
            f"no guidance embedding (families with one: {', '.join(with_one)}): set it to null"
        )


def build_policy(hparams: Mapping[str, Any]) -> Policy:
    """The policy of ``hparams["pretrained_model_name_or_path"]`` (``family`` when given), not
    loaded yet; its ``distilled_guidance`` checked against the family."""
    cls = policy_class(hparams["pretrained_model_name_or_path"], hparams.get("family"))
    check_distilled_guidance(cls, hparams.get("distilled_guidance"))
    return cls(hparams)


def registered() -> Iterator[tuple[str, type[Policy]]]:
    """``(pipeline class name, policy class)`` of every registered family."""
    return iter(sorted(_REGISTRY.items()))

"""The reward protocol: an nn.Module scoring images in [0, 1] against their prompts."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from marble_pl.errors import ConfigError

__all__ = ["NAME_PATTERN", "Metadata", "Reward", "check_reward_name"]

Metadata = Sequence[Mapping[str, Any]]
"""One dict per image: the prompt's ``source`` (e.g. ``"ocr"``) and its data set's fields
(GenEval's ``tag``, ``include``, ...). Empty dicts for plain prompt files."""

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_RANGE_TOL = 1e-3


def check_reward_name(name: object) -> str:
    """Return `name` if it is usable as a TensorBoard tag part (`reward/<name>/mean`), else raise."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(
            f"invalid reward name {name!r}: use letters, digits, '_', '-' or '.' (no spaces or "
            "'/'), starting with a letter, digit or '_', e.g. 'pickscore' or 'clip_score'"
        )
    return name


class Reward(torch.nn.Module):
    """Base class of rewards: `forward(images[N,3,H,W] in [0,1], prompts) -> float32 scores[N]`.

    An nn.Module so Lightning moves its weights to the device. Calling it validates the inputs and
    output shape and scores under `torch.no_grad()`. Non-finite scores are passed through
    unchanged: the training module owns the NaN/inf policy (error or drop, never silent zeros).

    Specialist rewards (OCR, GenEval) apply to some prompts only: :meth:`applicable` says which
    (default: all), and ``forward`` may take a ``metadata`` argument (one dict per image, see
    :data:`Metadata`) to read the prompt's fields. A score where the reward does not apply is
    ignored (the official convention is NaN there); it is neither an error nor a drop.
    """

    name: str = ""

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        if name is not None:
            self.name = check_reward_name(name)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Score each image against its prompt; subclasses implement this."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(images, prompts)")

    def applicable(self, prompts: Sequence[str], metadata: Metadata | None = None) -> Tensor:
        """``BoolTensor[N]``: the samples this reward scores (default: every one).

        Specialist rewards override it (OCR: prompts with quoted text). Decided from the prompt
        and its metadata alone, before any image is scored, so every rank agrees on it.
        """
        return torch.ones(len(prompts), dtype=torch.bool)

    @classmethod
    def takes_metadata(cls) -> bool:
        """Whether ``forward`` accepts ``metadata=`` (rewards written before it existed do not)."""
        params = inspect.signature(cls.forward).parameters
        return "metadata" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )

    def __call__(
        self,
        images: Tensor,
        prompts: Sequence[str],
        *args: Any,
        metadata: Metadata | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Validate inputs, score under no_grad, and check that the output is a float32 [N]."""
        label = self.name or type(self).__name__
        _check_inputs(label, images, prompts)
        if metadata is not None:
            if len(metadata) != len(prompts):
                raise ValueError(
                    f"reward {label!r}: got {len(prompts)} prompts but {len(metadata)} metadata "
                    "entries: pass one dict per image"
                )
            if self.takes_metadata():
                kwargs["metadata"] = metadata
        with torch.no_grad():
            scores = super().__call__(images, prompts, *args, **kwargs)
        n = images.shape[0]
        if not isinstance(scores, Tensor):
            raise TypeError(
                f"reward {label!r} returned {type(scores).__name__}: forward must return a Tensor "
                f"of shape [{n}]"
            )
        if scores.shape != (n,):
            raise ValueError(
                f"reward {label!r} returned shape {tuple(scores.shape)} for {n} images: forward "
                f"must return one score per image, shape [{n}] (squeeze or reduce extra dims)"
            )
        return scores.float()


def _check_inputs(label: str, images: object, prompts: object) -> None:
    """Raise a clear error unless images is a float [N,3,H,W] in [0,1] and prompts has N strings."""
    if not isinstance(images, Tensor):
        raise TypeError(f"reward {label!r}: images must be a torch.Tensor, got {type(images)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"reward {label!r}: images must have shape [N, 3, H, W] (channels first, RGB), got "
            f"{tuple(images.shape)}: add a batch dim with unsqueeze(0) or permute(0, 3, 1, 2) "
            "from channels-last"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"reward {label!r}: images must be floating point in [0, 1], got {images.dtype}: "
            "convert uint8 images with images.float() / 255"
        )
    if images.numel() > 0:
        lo, hi = images.aminmax()
        if lo.item() < -_RANGE_TOL or hi.item() > 1 + _RANGE_TOL:
            raise ValueError(
                f"reward {label!r}: images must be in [0, 1], got min {lo.item():.3g} and max "
                f"{hi.item():.3g}: map [-1, 1] images with (x + 1) / 2 and clamp(0, 1)"
            )
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"reward {label!r}: prompts must be a sequence of strings (one per image), got "
            f"{type(prompts).__name__}"
        )
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"reward {label!r}: got {images.shape[0]} images but {len(prompts)} prompts: pass one "
            "prompt per image (repeat each prompt for its group)"
        )

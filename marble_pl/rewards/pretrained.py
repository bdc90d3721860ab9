"""Shared machinery of the rewards backed by pretrained weights (PickScore, HPSv2, ...).

- :class:`PretrainedReward`: lazy loading, a configurable dtype and device, CPU offloading
  between calls, and load errors that name the reward, the id and the fix.
- :func:`resolve_file`: one weights file from a local file, a local directory or a hub repo
  (``hf_hub_download``, honouring ``local_files_only`` and ``HF_HUB_OFFLINE``).
- :class:`ImageTransform`: the reward models' own resize / crop / pad / normalise, done on
  ``[N, 3, H, W]`` tensors in ``[0, 1]`` (no round trip through PIL).
- :class:`PreferenceMLP`: the 5-layer linear head of the LAION aesthetic predictor, reused by
  ImageReward.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marble_pl.errors import ConfigError
from marble_pl.models import TORCH_DTYPES, ModelLoadError, env_offline, looks_like_local_path
from marble_pl.rewards.base import Reward

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageTransform",
    "PreferenceMLP",
    "PretrainedReward",
    "RewardLoadError",
    "clip_features",
    "load_json",
    "looks_like_local_path",
    "parse_dtype",
    "require_local",
    "resolve_file",
    "torch_load_weights",
]


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardLoadError(ModelLoadError):
    """A reward model's weights, config or tokenizer could not be found or read."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` (or the torch dtype) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype) and dtype in TORCH_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in TORCH_DTYPES:
        return TORCH_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")


def require_local(name: str) -> None:
    """Raise ``FileNotFoundError`` if ``name`` can only be a local path and does not exist
    (so a typo in a path reads as one, not as a malformed hub id)."""
    if looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"no such file or directory {name!r}")


def resolve_file(
    name_or_path: str | os.PathLike[str],
    filename: str,
    *,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
) -> Path:
    """Path of ``filename``: ``name_or_path`` itself if it is a file, ``name_or_path/filename``
    if it is a directory, else ``hf_hub_download(name_or_path, filename)`` from the hub cache.

    Raises ``FileNotFoundError`` for a missing local path and the hub's errors (``OSError``
    subclasses) for a hub file that is not cached offline or cannot be downloaded.
    """
    from huggingface_hub import hf_hub_download

    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise FileNotFoundError(f"the directory {str(path)!r} has no {filename!r}")
    require_local(name)
    return Path(
        hf_hub_download(
            repo_id=name,
            filename=filename,
            revision=revision,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            local_files_only=local_files_only or env_offline(),
        )
    )


def load_json(
    name_or_path: str | os.PathLike[str],
    filename: str,
    **kwargs: Any,
) -> dict[str, Any]:
    """Read a JSON file located as :func:`resolve_file` does."""
    return json.loads(resolve_file(name_or_path, filename, **kwargs).read_text())


def torch_load_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """``torch.load(path, weights_only=True)`` on the CPU, unwrapping ``{"state_dict": ...}``.

    Also strips the ``module.`` prefix that DistributedDataParallel checkpoints carry. The file
    is memory-mapped when its format allows. Unreadable files raise ``ValueError``.
    """
    import pickle

    try:
        try:
            obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"torch.load(weights_only=True) cannot read it ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); only plain "
            "state dicts of tensors load without running pickled code"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a state dict")
    return {
        (k[len("module.") :] if k.startswith("module.") else k): v
        for k, v in obj.items()
        if isinstance(v, Tensor)
    }


# --------------------------------------------------------------------------------------------
# Image preprocessing on tensors
# --------------------------------------------------------------------------------------------

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes used in image-processor configs


def _pair(value: Any, key_h: str = "height", key_w: str = "width") -> tuple[int, int] | None:
    """An int or ``{"height", "width"}`` size as ``(h, w)``; None for anything else."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Mapping) and key_h in value and key_w in value:
        return (int(value[key_h]), int(value[key_w]))
    return None


def _triple(values: Any) -> tuple[float, float, float]:
    """Per-channel mean/std as three floats."""
    r, g, b = (float(v) for v in values)
    return (r, g, b)


@dataclass(frozen=True)
class ImageTransform:
    """A reward model's image preprocessing, applied to ``[N, 3, H, W]`` tensors in ``[0, 1]``.

    ``mode="crop"`` is CLIP's: resize the shortest edge to ``size`` (or to exactly ``(h, w)``
    when ``size`` is a pair), then center-crop ``crop``. ``mode="pad"`` is HPSv2's
    ``ResizeMaxSize``: resize the longest edge to ``size`` and pad with black to a square.
    Resizing is ``interpolate(..., antialias=True)`` (PIL-like, Keys a = -0.5), clamped to
    ``[0, 1]`` when ``clamp`` (as a resize of uint8 PIL images is; torchvision's resize of float
    tensors, HPSv2's path, is not); a resize to the current size is skipped. The crop's top-left
    corner is ``(H - h) // 2`` (transformers, ``crop_rounding="floor"``) or
    ``round((H - h) / 2)`` (torchvision's ``CenterCrop``, ``"round"``). Then
    ``(x - mean) / std``.
    """

    size: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    mode: Literal["crop", "pad"] = "crop"
    interpolation: str = "bicubic"
    clamp: bool = True
    crop_rounding: Literal["floor", "round"] = "floor"

    @classmethod
    def from_processor_config(cls, config: Mapping[str, Any]) -> ImageTransform:
        """Read a transformers ``preprocessor_config.json`` (CLIPImageProcessor / feature
        extractor): ``size`` (int, ``{"shortest_edge"}`` or ``{"height", "width"}``),
        ``crop_size``, ``image_mean``, ``image_std``, ``resample`` and the ``do_*`` switches."""
        size: int | tuple[int, int] | None = None
        if config.get("do_resize", True):
            raw = config.get("size", 224)
            if isinstance(raw, Mapping) and "shortest_edge" in raw:
                size = int(raw["shortest_edge"])
            elif isinstance(raw, int):
                size = raw
            else:
                size = _pair(raw)
                if size is None:
                    raise ValueError(f"unsupported image-processor size {raw!r}")
        crop = _pair(config.get("crop_size", 224)) if config.get("do_center_crop", True) else None
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if config.get("do_normalize", True):
            mean = _triple(config.get("image_mean", OPENAI_CLIP_MEAN))
            std = _triple(config.get("image_std", OPENAI_CLIP_STD))
        interpolation = _RESAMPLE.get(int(config.get("resample", 3)), "bicubic")
        return cls(size=size, crop=crop, mean=mean, std=std, interpolation=interpolation)

    def __call__(self, images: Tensor) -> Tensor:
        """Resize, crop or pad, and normalise float images in ``[0, 1]``; returns float32."""
        x = images.float()
        if self.mode == "pad":
            x = self._resize_longest_and_pad(x)
        else:
            if self.size is not None:
                x = self._resize(x, self._shortest_edge_size(x.shape[-2], x.shape[-1]))
            if self.crop is not None:
                x = center_crop(x, self.crop, rounding=self.crop_rounding)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def _shortest_edge_size(self, h: int, w: int) -> tuple[int, int]:
        """Output size as transformers' ``get_resize_output_image_size`` (long side floored)."""
        if isinstance(self.size, tuple):
            return self.size
        assert self.size is not None
        if h <= w:
            return (self.size, int(self.size * w / h))
        return (int(self.size * h / w), self.size)

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        out = F.interpolate(
            x, size=size, mode=self.interpolation, align_corners=False, antialias=True
        )
        return out.clamp(0.0, 1.0)

    def _resize_longest_and_pad(self, x: Tensor) -> Tensor:
        """HPSv2's ``ResizeMaxSize(size, fill=0)``: longest edge to ``size``, centred black pad."""
        if not isinstance(self.size, int):
            raise ValueError(f"mode='pad' needs an int size, got {self.size!r}")
        h, w = x.shape[-2:]
        scale = self.size / max(h, w)
        new_h, new_w = round(h * scale), round(w * scale)
        x = self._resize(x, (new_h, new_w))
        pad_h, pad_w = self.size - new_h, self.size - new_w
        return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def center_crop(
    x: Tensor, size: tuple[int, int], rounding: Literal["floor", "round"] = "floor"
) -> Tensor:
    """Center crop to ``size``: top = ``(H - h) // 2`` (transformers) or ``round((H - h) / 2)``
    (torchvision, ``rounding="round"``); zero-pads first if the image is smaller."""
    h, w = size
    height, width = x.shape[-2:]
    if height < h or width < w:
        ph, pw = max(h - height, 0), max(w - width, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        height, width = x.shape[-2:]
    if rounding == "round":
        top, left = int(round((height - h) / 2.0)), int(round((width - w) / 2.0))
    else:
        top, left = (height - h) // 2, (width - w) // 2
    return x[..., top : top + h, left : left + w]


# --------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------


class PreferenceMLP(nn.Module):
    """The LAION improved aesthetic predictor's head, also ImageReward's: five linear layers
    ``in -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropouts 0.2, 0.2, 0.1 and no activations.

    Its ``state_dict`` keys (``layers.0.weight`` ... ``layers.7.bias``) are those of the
    authors' ``MLP`` so their files load as they are.
    """

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[N, input_size] -> [N, 1]``."""
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]) -> PreferenceMLP:
        """Build with the input size of ``layers.0.weight`` and load ``state_dict`` strictly."""
        if "layers.0.weight" not in state_dict:
            raise ValueError(
                f"not a LAION-aesthetic-style MLP state dict (keys {sorted(state_dict)[:6]}...): "
                "expected layers.0.weight ... layers.7.bias"
            )
        head = cls(int(state_dict["layers.0.weight"].shape[1]))
        head.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        return head


def clip_features(
    model: nn.Module,
    pixel_values: Tensor | None = None,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """L2-normalised projected CLIP image and text embeddings of a transformers ``CLIPModel``.

    Written against the towers (``vision_model`` + ``visual_projection``, ``text_model`` +
    ``text_projection``) so it reads the same in transformers 4 and 5.
    """
    image = text = None
    if pixel_values is not None:
        pooled = model.vision_model(pixel_values=pixel_values).pooler_output
        image = F.normalize(model.visual_projection(pooled).float(), dim=-1)
    if input_ids is not None:
        pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        text = F.normalize(model.text_projection(pooled).float(), dim=-1)
    return image, text


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (unused text tower keys and the like) for a block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def check_loading_info(reward: str, what: str, info: Mapping[str, Any]) -> None:
    """Raise :class:`RewardLoadError` if a converted state dict did not fill the model exactly."""
    problems = {
        k: sorted(map(str, info.get(k) or ()))
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(
            f"{k}: {v[:8]}{' ...' if len(v) > 8 else ''}" for k, v in problems.items()
        )
        raise RewardLoadError(
            f"reward {reward!r}: the weights in {what} do not fit the model ({detail}). Check "
            "that the file is the one this reward expects and that the config matches it."
        )


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------


class PretrainedReward(Reward):
    """Base of rewards that score with pretrained weights; subclasses implement ``_build``
    (load and return the scoring ``nn.Module``) and ``score``.

    Loading is lazy: nothing is read until the first call or an explicit :meth:`load`, so
    configs print and validate without the weights. Placement:

    - ``device=None`` (default): the model is a registered submodule and follows the training
      module (Lightning moves it); loaded lazily, it goes to the images' device.
    - ``device="cuda:1"`` / ``"cpu"``: pinned there; Lightning's moves do not touch it (it is
      held outside the module tree, so it is also never in checkpoints or ``parameters()``);
      images are moved there and the scores come back on the images' device.
    - ``offload_to_cpu=True``: kept on the CPU between calls and moved to ``device`` (or the
      images' device) only while scoring, to free accelerator memory during rollouts.

    ``dtype`` (``float32``, ``float16`` or ``bfloat16``) is the weights' dtype; inputs are cast
    to it, scores are float32. The model is always in eval mode without gradients.
    """

    def __init__(
        self,
        *,
        local_files_only: bool = False,
        cache_dir: str | None = None,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        offload_to_cpu: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.local_files_only = bool(local_files_only)
        self.cache_dir = cache_dir
        self.revision = revision
        try:
            self.pinned_device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(
                f"reward {self.name!r}: device must be None (follow the training module) or a "
                f"torch device string such as 'cuda:1' or 'cpu', got {device!r}"
            ) from err
        try:
            self.torch_dtype = parse_dtype(dtype)
        except ValueError as err:  # one line at config time, naming the reward
            raise ConfigError(f"reward {self.name!r}: {err}") from None
        self.offload_to_cpu = bool(offload_to_cpu)
        object.__setattr__(self, "_hidden_model", None)
        self.model: nn.Module | None = None
        self.random_weights = False
        """Build the real architecture with random weights instead of loading it (set by
        ``MarbleModule(random_weights=True)``; :meth:`_build_random`)."""

    # ---------------------------------------------------------------- subclass interface

    def _build(self) -> nn.Module:
        """Load and return the scoring module (weights in ``self.torch_dtype``, on the CPU)."""
        raise NotImplementedError

    def _build_random(self) -> nn.Module:
        """The scoring module at its real architecture with random weights (nothing read but
        configs; byte-level tokenizers). Scores are noise; shapes, memory and time are real."""
        raise RewardLoadError(
            f"reward {self.name!r} ({type(self).__name__}) cannot be built with random weights: "
            "it defines no _build_random(); leave it out of a model.random_weights run"
        )

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores ``[N]`` of images already on the model's device (float32 in ``[0, 1]``)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- loading and placement

    @property
    def registered(self) -> bool:
        """Whether the model lives in the module tree (follows ``.to()``) or is held aside."""
        return self.pinned_device is None and not self.offload_to_cpu

    @property
    def loaded(self) -> bool:
        """Whether the weights have been loaded."""
        return self.scorer is not None

    @property
    def scorer(self) -> nn.Module | None:
        """The loaded scoring module (None before loading), wherever it is held."""
        return self.model if self.registered else self._hidden_model

    def load(self, device: torch.device | str | None = None) -> nn.Module:
        """Load the weights now (idempotent) and return the scoring module.

        ``device`` places a registered model (default: the CPU); pinned and offloaded models
        go to their own device.
        """
        scorer = self.scorer
        if scorer is not None:
            return scorer
        built = self._build_random() if self.random_weights else self._build()
        scorer = built.eval().requires_grad_(False)
        if self.registered:
            self.model = scorer.to(device) if device is not None else scorer
        else:
            target = torch.device("cpu") if self.offload_to_cpu else self.pinned_device
            object.__setattr__(self, "_hidden_model", scorer.to(target))
        return scorer

    def train(self, mode: bool = True) -> PretrainedReward:
        """Switch the wrapper's mode; the scoring model itself stays in eval mode."""
        super().train(mode)
        scorer = self.scorer
        if scorer is not None:
            scorer.eval()
        return self

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Load if needed, move to the scoring device, score, return float32 ``[N]``."""
        scorer = self.load(images.device if self.registered else None)
        if self.registered:
            run_device = _module_device(scorer, images.device)
        else:
            run_device = self.pinned_device or images.device
        if self.offload_to_cpu:
            scorer.to(run_device)
        try:
            scorer.eval()
            # The configured dtype, not an enclosing autocast (e.g. Lightning's bf16-mixed).
            with torch.autocast(run_device.type, enabled=False):
                scores = self.score(images.to(run_device, torch.float32), list(prompts))
        finally:
            if self.offload_to_cpu:
                scorer.to("cpu")
        return scores.float().to(images.device)

    def _load_error(
        self, what: str, name: str, err: BaseException, *, download: str, option: str
    ) -> RewardLoadError:
        """The user-facing error for weights/configs that cannot be found or read."""
        mode = f"local_files_only={self.local_files_only}"
        if env_offline():
            mode += ", HF_HUB_OFFLINE set"
        reason = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        )
        if looks_like_local_path(name):
            fix = f"check the path, or pass {option}=<hub id or local path>"
        else:
            fix = (
                f"on a machine with network run `{download}` (or `huggingface-cli download ...`), "
                "then point HF_HOME (or this reward's cache_dir) at that cache; or pass "
                f"{option}=<local path> holding the downloaded files"
            )
            if self.local_files_only or env_offline():
                fix += "; or drop local_files_only / unset HF_HUB_OFFLINE to download now"
        return RewardLoadError(
            f"reward {self.name!r}: could not load {what} {name!r} ({mode}): {reason.rstrip('.')}. "
            f"Fix: {fix}."
        )

    @property
    def offline(self) -> bool:
        """``local_files_only`` as passed to the hub: the option or ``HF_HUB_OFFLINE``."""
        return self.local_files_only or env_offline()

    def extra_repr(self) -> str:
        where = "follows module" if self.pinned_device is None else str(self.pinned_device)
        return (
            f"name={self.name!r}, dtype={str(self.torch_dtype).removeprefix('torch.')}, "
            f"device={where}, offload_to_cpu={self.offload_to_cpu}, loaded={self.loaded}"
        )


def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    """Device of a module's first parameter or buffer (``default`` if it has none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return default


def module_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of a module's first floating parameter (float32 if none)."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def hub_guard_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "not found / not readable" when loading from a path or the hub."""
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    return (OSError, HFValidationError, EntryNotFoundError, json.JSONDecodeError)


def sqrt_int(n: int) -> int:
    """Integer square root, raising if ``n`` is not a perfect square (ViT position counts)."""
    root = math.isqrt(n)
    if root * root != n:
        raise ValueError(f"{n} position embeddings (without the class token) is not a square grid")
    return root


# ------------------------------------------------------------------ random weights


def clip_architecture(name: str) -> Any:
    """The ``CLIPConfig`` of ``name``: its local or cached ``config.json``, else the published
    one shipped in :mod:`marble_pl.architectures`; a ``RewardLoadError`` for another model."""
    from transformers import CLIPConfig

    from marble_pl.architectures import shipped_clip_config

    try:
        return CLIPConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        shipped = shipped_clip_config(name)
    if shipped is None:
        raise RewardLoadError(
            f"cannot build the CLIP {name!r} with random weights: its config.json is neither "
            "local, cached nor shipped (shipped: PickScore_v1, CLIP-ViT-H-14, clip-vit-large-"
            "patch14)"
        )
    return CLIPConfig(**shipped)


def clip_crop_transform(image_size: int) -> ImageTransform:
    """CLIP's preprocessing: shortest edge to ``image_size``, centre crop, CLIP mean/std."""
    return ImageTransform(size=image_size, crop=(image_size, image_size))

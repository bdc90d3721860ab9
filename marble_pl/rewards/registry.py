"""Reward registry: build rewards from names, `{"name": ..., **kwargs}` or `class_path` specs."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from marble_pl.errors import ConfigError, MarbleUserError
from marble_pl.rewards.base import Reward, check_reward_name

__all__ = ["RewardSpec", "available_rewards", "build_reward", "build_rewards", "register_reward"]

RewardSpec = str | Mapping[str, Any] | Reward
R = TypeVar("R", bound=type[Reward])

_REGISTRY: dict[str, type[Reward]] = {}


class RewardImportError(MarbleUserError, ImportError):
    """A reward ``class_path`` names a module or class that cannot be imported."""


class RewardClassError(MarbleUserError, TypeError):
    """A reward ``class_path`` names a class that is not a :class:`Reward`."""


def register_reward(name: str) -> Callable[[R], R]:
    """Class decorator registering a Reward subclass under `name` (also set as its `name`)."""
    check_reward_name(name)

    def decorator(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(f"register_reward({name!r}) decorates Reward subclasses, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and _qualname(known) != _qualname(cls):
            raise ValueError(
                f"reward name {name!r} is already registered by {_qualname(known)}: pick another "
                "name for " + _qualname(cls)
            )
        own_name = cls.__dict__.get("name")
        if own_name and own_name != name:
            raise ValueError(
                f"{_qualname(cls)} sets name = {own_name!r} but is registered as {name!r}: make "
                "them equal or drop the class attribute"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_rewards() -> list[str]:
    """Names of all registered rewards, sorted."""
    return sorted(_REGISTRY)


def build_reward(spec: RewardSpec) -> Reward:
    """Build one reward from a name, a `{"name": ..., **kwargs}` or `{"class_path", "init_args"}`.

    Either mapping may add `"alias"` to rename the instance (e.g. two qualities of one reward).
    A ready Reward instance is returned as is.
    """
    if isinstance(spec, Reward):
        reward = spec
    elif isinstance(spec, str):
        reward = _instantiate(_lookup(spec), {}, spec)
    elif isinstance(spec, Mapping):
        reward = _build_from_mapping(spec)
    else:
        raise TypeError(
            f"reward spec must be a name, a mapping or a Reward, got {type(spec).__name__}: "
            f'e.g. "brightness" or {{"name": "compressibility", "quality": 80}}'
        )
    if not reward.name:
        raise ConfigError(
            f"reward {type(reward).__name__} has no name: set a class attribute name = '...', "
            'register it with @register_reward, or add "alias" to its spec'
        )
    check_reward_name(reward.name)
    return reward


def build_rewards(specs: Sequence[RewardSpec]) -> torch.nn.ModuleList:
    """Build a non-empty list of rewards with unique names, as a ModuleList for device moves."""
    if isinstance(specs, (str, Mapping, Reward)) or not isinstance(specs, Sequence):
        raise TypeError(
            f"rewards must be a list of specs, got {type(specs).__name__}: wrap it, e.g. "
            '["brightness", "saturation"]'
        )
    if not specs:
        raise ConfigError(
            f"model.rewards is empty: list at least one, e.g. {available_rewards()[:3]} "
            f"(available: {available_rewards()})"
        )
    rewards = [build_reward(spec) for spec in specs]
    counts = Counter(reward.name for reward in rewards)
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        raise ConfigError(
            f"duplicate reward names {duplicates} in model.rewards: each reward needs a unique "
            'name for its metrics and coefficients; give repeats an "alias" in their spec'
        )
    return torch.nn.ModuleList(rewards)


def _build_from_mapping(spec: Mapping[str, Any]) -> Reward:
    """Build from `{"name": ..., **kwargs}` or `{"class_path": ..., "init_args": {...}}`."""
    kwargs = dict(spec)
    alias = kwargs.pop("alias", None)
    if "class_path" in kwargs:
        class_path = kwargs.pop("class_path")
        init_args = kwargs.pop("init_args", None) or {}
        if kwargs:
            raise ConfigError(
                f"class_path reward spec {class_path!r} has unexpected keys {sorted(kwargs)}: "
                "put constructor arguments under init_args"
            )
        if not isinstance(init_args, Mapping):
            raise TypeError(f"init_args of {class_path!r} must be a mapping, got {init_args!r}")
        reward = _instantiate(_import_reward_class(class_path), dict(init_args), class_path)
    elif "name" in kwargs:
        name = kwargs.pop("name")
        reward = _instantiate(_lookup(name), kwargs, name)
    else:
        raise ConfigError(
            f"reward spec {dict(spec)!r} in model.rewards has neither 'name' nor 'class_path': "
            'write {"name": "brightness"} or {"class_path": "pkg.module.MyReward", "init_args": {}}'
        )
    if alias is not None:
        reward.name = check_reward_name(alias)
    return reward


def _lookup(name: object) -> type[Reward]:
    """The registered class for `name`, or a ConfigError listing names and the closest match."""
    if not isinstance(name, str):
        raise TypeError(f"reward name must be a string, got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown reward {name!r} in model.rewards.{hint} Available: {available_rewards()}; "
        'for your own reward use {"class_path": "pkg.module.MyReward", "init_args": {...}}'
    )


def _import_reward_class(class_path: object) -> type[Reward]:
    """Import `pkg.module.Class` and check it is a Reward subclass."""
    if not isinstance(class_path, str) or "." not in class_path:
        raise ConfigError(
            f"class_path must be a dotted path 'package.module.ClassName', got {class_path!r}"
        )
    module_name, _, class_name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardImportError(
            f"cannot import module {module_name!r} for reward class_path {class_path!r}: {err}; "
            "check the spelling and that the package is installed or on PYTHONPATH"
        ) from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise RewardImportError(
            f"module {module_name!r} has no attribute {class_name!r} (reward class_path "
            f"{class_path!r} in model.rewards): check the class name's spelling"
        )
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise RewardClassError(
            f"{class_path} is not a subclass of marble_pl.rewards.Reward: derive it from Reward "
            "and implement forward(images, prompts) -> Tensor[N]"
        )
    return cls


def _instantiate(cls: type[Reward], kwargs: dict[str, Any], label: str) -> Reward:
    """Call `cls(**kwargs)`, turning a bad keyword into an error listing the accepted ones."""
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs")]
        raise ConfigError(
            f"bad arguments {sorted(kwargs)} for reward {label!r} in model.rewards: {err}; "
            f"it accepts {params}"
        ) from err
    return cls(**kwargs)


def _qualname(cls: type) -> str:
    """`module.QualName` of a class, for messages and re-registration checks."""
    return f"{cls.__module__}.{cls.__qualname__}"

"""Explicit resume: which checkpoint, which run folder, and which settings may change.

A plain ``marble fit`` always starts a new run. ``--ckpt_path PATH`` resumes that checkpoint in
the run folder it lives in; ``--ckpt_path last`` resumes the newest checkpoint of the configured
run (``<save_dir>/<name>/version_*/checkpoints``) or, when there is none yet, starts a new run:
the mode for pre-emptible jobs that re-run one command. Settings that change shapes or meaning
(:data:`FIXED_ON_RESUME`) are refused with old and new values; the others apply and are listed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from marble_pl.checks import load_checkpoint_file
from marble_pl.errors import CheckpointError, ConfigError

__all__ = [
    "FIXED_ON_RESUME",
    "IGNORED_ON_RESUME",
    "ResumePlan",
    "diff_settings",
    "reshaped_settings",
    "find_last_checkpoint",
    "flatten",
    "run_root",
    "version_of",
]

FIXED_ON_RESUME: tuple[str, ...] = (
    "model.pretrained_model_name_or_path",
    "model.rewards",
    "model.reward_weights",
    "model.single_reward",
    "model.balancer",
    "model.gradient_space",
    "model.normalization",
    "model.loss_form",
    "model.lora_rank",
    "model.lora_alpha",
    "model.lora_target_modules",
)
"""Settings a resumed run must keep: the LoRA's shapes, the rewards and what the update means."""

IGNORED_ON_RESUME: tuple[str, ...] = (
    "ckpt_path",
    "config",
    "trainer.logger.init_args.version",
    "model._instantiator",
    "model._class_path",
)
"""Keys that say how the run was started, not how it trains."""

_VERSION = re.compile(r"version_(\d+)")


@dataclass
class ResumePlan:
    """What ``marble fit`` does with ``--ckpt_path``: the file, its step and the run's version."""

    ckpt_path: Path | None
    step: int = 0
    version: int | str | None = None
    changed: list[tuple[str, Any, Any]] = field(default_factory=list)
    message: str = ""


def run_root(logger: Any, default_root_dir: str | None) -> Path | None:
    """The folder that holds the run's ``version_*`` folders, from the ``trainer.logger`` config."""
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if logger is False:
        return None
    if logger is None or logger is True:
        return Path(default_root_dir or ".") / "lightning_logs"
    args = _get(logger, "init_args") or {}
    save_dir = _get(args, "save_dir")
    if save_dir is None:
        return None
    name = _get(args, "name")
    return Path(save_dir) / name if name else Path(save_dir)


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` for a dict or a jsonargparse Namespace, else None."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def find_last_checkpoint(root: Path) -> Path | None:
    """The most recently written ``*.ckpt`` of any ``version_*`` of a run (None: none yet)."""
    if not root.is_dir():
        return None
    found = [p for p in root.glob("version_*/checkpoints/*.ckpt") if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p))) if found else None


def version_of(ckpt: Path, root: Path | None) -> int | None:
    """``N`` when ``ckpt`` is ``<root>/version_N/checkpoints/*.ckpt``: resume in that folder."""
    if root is None:
        return None
    try:
        rel = ckpt.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    if len(rel.parts) == 3 and rel.parts[1] == "checkpoints":
        match = _VERSION.fullmatch(rel.parts[0])
        if match:
            return int(match.group(1))
    return None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}``; a list of mappings (callbacks) is indexed, ``a.0.b``; other lists
    stay leaves (a list of reward names changes as a whole)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, (list, tuple)) and tree and all(isinstance(x, Mapping) for x in tree):
        out = {}
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def _same(a: Any, b: Any) -> bool:
    """Equality that treats tuples as lists and 1 == 1.0, as YAML round trips do."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or (
            isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        )
    return a == b


def diff_settings(
    old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = IGNORED_ON_RESUME
) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for every flattened key whose value differs (keys in both only)."""
    skip = tuple(ignore)
    out = []
    for key in sorted(set(old) & set(new)):
        if key in skip or any(key.startswith(f"{s}.") for s in skip):
            continue
        if not _same(old[key], new[key]):
            out.append((key, old[key], new[key]))
    return out


def reshaped_settings(
    old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] = FIXED_ON_RESUME
) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for settings whose flattened shape changed, e.g. ``model.balancer``
    from a name (``marble``) to a class (``model.balancer.class_path``, ...), which
    :func:`diff_settings` (keys in both only) cannot see."""
    out = []
    for key in keys:
        old_sub = {k: v for k, v in old.items() if k == key or k.startswith(f"{key}.")}
        new_sub = {k: v for k, v in new.items() if k == key or k.startswith(f"{key}.")}
        if old_sub and new_sub and old_sub.keys() != new_sub.keys():
            out.append((key, _unflat(old_sub, key), _unflat(new_sub, key)))
    return out


def _unflat(sub: Mapping[str, Any], key: str) -> Any:
    """The value of ``key`` itself, or its flattened sub-settings without the prefix."""
    return sub[key] if key in sub else {k[len(key) + 1 :]: v for k, v in sub.items()}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_changes(changes: list[tuple[str, Any, Any]], ckpt: Path) -> None:
    """Refuse changes of :data:`FIXED_ON_RESUME` settings, listing old and new values."""
    fixed = [
        c for c in changes if any(c[0] == f or c[0].startswith(f"{f}.") for f in FIXED_ON_RESUME)
    ]
    if fixed:
        listed = "; ".join(
            f"{k}: {_short(o)} (checkpoint) -> {_short(n)} (now)" for k, o, n in fixed
        )
        raise ConfigError(
            f"cannot load {str(ckpt)!r} with changed {listed}. These settings change the "
            "LoRA's shapes or what the update means: use the checkpoint's values (its run "
            "folder's config.yaml), or start a new run without --ckpt_path"
        )


def saved_settings(ckpt: Mapping[str, Any], ckpt_path: Path) -> dict[str, Any]:
    """The run's settings: its ``config.yaml`` when beside it, the checkpoint's hparams on top."""
    settings: dict[str, Any] = {}
    config_file = ckpt_path.parent.parent / "config.yaml"
    if config_file.is_file():
        try:
            loaded = yaml.safe_load(config_file.read_text())
        except (OSError, yaml.YAMLError):
            loaded = None
        if isinstance(loaded, Mapping):
            settings.update(flatten(loaded))
    hparams = dict(ckpt.get("hyper_parameters") or {})
    settings.update(flatten({"model": hparams}))
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    settings.update(flatten({"data": data}))
    return settings


def plan_resume(
    ckpt_arg: str | None, config: Mapping[str, Any], *, training: bool = True
) -> ResumePlan:
    """Resolve ``--ckpt_path`` against the subcommand's config (a plain dict).

    ``training`` (``fit``) also refuses a checkpoint that already reached ``max_steps``; the
    other subcommands only load the weights, so only the fixed settings are checked.
    """
    if not ckpt_arg:
        return ResumePlan(None)
    trainer = config.get("trainer") or {}
    root = run_root(trainer.get("logger"), trainer.get("default_root_dir"))
    if ckpt_arg == "last":
        found = find_last_checkpoint(root) if root is not None else None
        if found is None:
            where = str(root) if root is not None else "the run folder"
            return ResumePlan(None, message=f"no checkpoint under {where} yet: starting a new run")
        path = found
    elif ckpt_arg in ("best", "hpc", "registry"):
        raise ConfigError(
            f"--ckpt_path {ckpt_arg} is not supported by marble fit: pass a checkpoint file or "
            "`last` (the newest checkpoint of this run)"
        )
    else:
        path = Path(ckpt_arg).expanduser()
    ckpt = load_checkpoint_file(path)
    step = int(ckpt["global_step"])
    max_steps = trainer.get("max_steps")
    if training and max_steps is not None and max_steps >= 0 and step >= max_steps:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is at step {step} and trainer.max_steps is {max_steps}: "
            f"nothing left to train. Pass --trainer.max_steps N with N > {step} to train further"
        )
    old, new = saved_settings(ckpt, path), flatten(dict(config))
    changes = diff_settings(old, new) + reshaped_settings(old, new)
    check_changes(changes, path)
    version = version_of(path, root)
    where = f"{root}/version_{version}" if version is not None else "a new run folder"
    verb = "resuming" if training else "loading"
    message = f"{verb} {path} (step {step})" + (f" in {where}" if training else "")
    if changes:
        message += "; changed: " + ", ".join(
            f"{k} {_short(o)} -> {_short(n)}" for k, o, n in changes
        )
    return ResumePlan(path, step, version, changes, message)

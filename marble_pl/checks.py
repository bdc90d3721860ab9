"""Checks run before any model is loaded, so a user mistake costs seconds, not a model load.

* :func:`check_choices`, :func:`check_ranges`, :func:`check_old_policy_decay`,
  :func:`check_guidance`, :func:`check_optimizer`: ``model.*`` settings (``MarbleModule.__init__``
  calls them); :func:`check_resolution` once the sizes are known.

* :func:`check_run_folder`: the folder Lightning will write logs and checkpoints to can be written.
* :func:`load_checkpoint_file`: a checkpoint loads, or a :class:`~marble_pl.errors.CheckpointError`
  names the file and the fix (torch's own errors, e.g. ``OSError: [Errno 22] Invalid argument``
  for a truncated file, name neither).
* :func:`resolution_multiple`: what the resolution must be a multiple of, read from the
  transformer's and VAE's ``config.json`` only (no weights).

Each raises a :class:`~marble_pl.errors.MarbleUserError`, which ``marble`` prints as one line.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from marble_pl.errors import CheckpointError, ConfigError, RunFolderError
from marble_pl.models import TORCH_DTYPES
from marble_pl.ranges import check_guidance, check_ranges
from marble_pl.schedules import DecaySchedule, decay_schedule

__all__ = [
    "check_choices",
    "check_guidance",
    "check_old_policy_decay",
    "check_optimizer",
    "check_ranges",
    "check_resolution",
    "check_run_folder",
    "load_checkpoint_file",
    "probe_optimizer",
    "resolution_multiple",
]

RUN_FOLDER_SETTING = "trainer.logger.init_args.save_dir"
"""How a user sets the run folder of the default TensorBoard logger."""

# Entries every checkpoint written by Lightning's ``Trainer.save_checkpoint`` holds.
_LIGHTNING_KEYS = ("state_dict", "global_step")


# -------------------------------------------------------------------------------- settings
# Run by MarbleModule.__init__, i.e. when the CLI builds the module: a mistyped setting is
# reported in seconds, before any model is loaded. Messages name the setting as a config writes
# it (``model.lora_rank``) and the fix.


def check_choices(
    gradient_space: str, loss_form: str, nonfinite_rewards: str, weights_dtype: str
) -> None:
    """The string settings name one of their choices (the CLI checks them too; Python does not)."""
    choices = {
        "gradient_space": (gradient_space, ("output", "gramian", "parameters")),
        "loss_form": (loss_form, ("reference", "plain")),
        "nonfinite_rewards": (nonfinite_rewards, ("error", "drop")),
        "weights_dtype": (weights_dtype, tuple(sorted(TORCH_DTYPES))),
    }
    for setting, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"model.{setting} must be one of {list(allowed)}, got {value!r}")


def check_old_policy_decay(spec: float | DecaySchedule | Mapping[str, Any]) -> DecaySchedule:
    """``model.old_policy_decay`` as a :class:`~marble_pl.schedules.DecaySchedule`: a number is a
    constant decay, a mapping DiffusionNFT's hold-then-ramp."""
    try:
        return decay_schedule(spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"model.old_policy_decay: {err}. Use a number in [0, 1] for a constant decay "
            "(e.g. 0.5), or DiffusionNFT's ramp {hold_steps: 0, slope: 0.001, max_decay: 0.5}"
        ) from err


def check_resolution(
    resolution: int, multiple: int, vae_scale_factor: int, patch_size: int
) -> None:
    """The image side must be a whole number of transformer patches of VAE latents."""
    if resolution % multiple:
        lower = resolution // multiple * multiple
        nearest = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
        raise ConfigError(
            f"model.resolution={resolution} must be a multiple of {multiple} (VAE scale factor "
            f"{vae_scale_factor} x patch size {patch_size}): use e.g. {nearest}"
        )


def probe_optimizer(optimizer: OptimizerCallable) -> torch.optim.Optimizer:
    """The configured optimizer built on one dummy 2-D parameter (some, like Muon, take only
    matrices, as LoRA's are): its hyperparameters without the model."""
    return optimizer([torch.nn.Parameter(torch.zeros(2, 2))])


def check_optimizer(optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None) -> None:
    """Build the optimizer (and scheduler) once on a dummy parameter, so a bad ``lr`` fails now.

    torch checks its hyperparameters (``lr >= 0``, betas in [0, 1), ...) only when the optimizer
    is built, which ``configure_optimizers`` does after the model is loaded.
    """
    try:
        opt = probe_optimizer(optimizer)
    except ValueError as err:
        raise ConfigError(
            f"model.optimizer: {err}; fix that value under model.optimizer.init_args "
            "(e.g. lr: 1.0e-4, weight_decay: 0.0)"
        ) from err
    if lr_scheduler is None:
        return
    try:
        lr_scheduler(opt)
    except ValueError as err:
        raise ConfigError(
            f"model.lr_scheduler: {err}; fix that value under model.lr_scheduler.init_args"
        ) from err


# -------------------------------------------------------------------------------- run folder


def check_run_folder(path: str | os.PathLike[str], setting: str = RUN_FOLDER_SETTING) -> None:
    """Raise :class:`RunFolderError` unless files can be written at ``path`` (created or not).

    Nothing is created: the nearest existing folder on the way to ``path`` must be a folder the
    process can create a file in (probed with a real temporary file, so read-only mounts and
    root-squashed network folders are caught too, not only permission bits). ``setting`` is how
    the user sets that folder, named in the message with the fix.
    """
    target = Path(path).expanduser()
    existing = _nearest_existing(target)
    if not existing.is_dir():
        raise RunFolderError(
            f"cannot write the run folder {str(target)!r} ({setting}): {str(existing)!r} is a "
            f"file, not a folder; set {setting} to a folder path, or move that file away"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".marble-write-test-"):
            pass  # removed on close
    except OSError as err:
        raise RunFolderError(
            f"cannot write the run folder {str(target)!r} ({setting}): creating a file in "
            f"{str(existing)!r} failed ({err.strerror or err}); set {setting} to a folder you "
            "can write, or fix that folder's permissions"
        ) from err


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (a relative path ends at the cwd)."""
    absolute = path if path.is_absolute() else Path.cwd() / path
    for candidate in (absolute, *absolute.parents):
        if candidate.exists():
            return candidate
    return Path(absolute.anchor)


# -------------------------------------------------------------------------------- checkpoints


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU, or raise a :class:`CheckpointError` with the fix.

    Loads with ``weights_only=True`` (no code runs from the file), which reads every entry
    Lightning and marble-pl write (tensors, plain containers and numbers).
    """
    file = Path(path).expanduser()
    _check_is_file(file)
    try:
        checkpoint = _torch_load(file)
    except CheckpointError:
        raise
    except Exception as err:  # torch.load fails on damaged bytes with any of a dozen types
        size = file.stat().st_size
        raise CheckpointError(
            f"checkpoint {str(file)!r} ({size} bytes) is truncated or corrupt "
            f"({_describe(err)}); the write was probably interrupted or the copy incomplete: "
            "resume from another checkpoint (e.g. last.ckpt or an earlier step's file), or drop "
            "ckpt_path to start fresh"
        ) from err
    missing = [
        key for key in _LIGHTNING_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint
    ]
    if missing:
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else []
        raise CheckpointError(
            f"{str(file)!r} is not a Lightning checkpoint: it has no {missing} "
            f"({type(checkpoint).__name__} with keys {found}); pass a .ckpt written by "
            "`marble fit` (ModelCheckpoint / InterruptCheckpoint); to use exported LoRA "
            "weights, load them with diffusers instead"
        )
    return checkpoint


def _check_is_file(file: Path) -> None:
    """A missing path or a folder gets an error that lists what to pass instead."""
    if file.is_dir():
        found = sorted(p.name for p in file.glob("*.ckpt"))
        example = "last.ckpt" if "last.ckpt" in found or not found else found[-1]
        hint = f" it holds {found[:5]}," if found else " it holds no .ckpt file;"
        raise CheckpointError(
            f"checkpoint {str(file)!r} is a folder, not a file:{hint} pass one .ckpt file "
            f"such as {str(file / example)!r}"
        )
    if not file.exists():
        raise CheckpointError(
            f"checkpoint {str(file)!r} does not exist: check the path (relative paths are "
            f"resolved from {str(Path.cwd())!r}; checkpoints are under <run folder>/checkpoints), "
            "or drop ckpt_path to start fresh"
        )


def _torch_load(file: Path) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``: no code runs from the file."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise  # a corrupt pickle stream
        raise CheckpointError(
            f"checkpoint {str(file)!r} holds objects the safe loader refuses ({_describe(err)}): "
            "marble-pl only loads checkpoints with weights_only=True; save plain containers, "
            "numbers and tensors in callback states"
        ) from None


def _describe(err: BaseException) -> str:
    """``Type: first sentence`` of an exception (torch's messages run for many lines)."""
    lines = str(err).strip().splitlines()
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


# -------------------------------------------------------------------------------- resolution


def resolution_multiple(
    pretrained_model_name_or_path: str | os.PathLike[str], *, local_files_only: bool
) -> tuple[int, int, int] | None:
    """``(multiple, vae_scale_factor, patch_size)`` from the configs only, or None if unreadable.

    The image side must be a multiple of ``vae_scale_factor x patch_size``. Only the
    transformer's and the VAE's ``config.json`` are read (a hub id downloads those two small
    files), so the check costs milliseconds, not the minutes of loading SD3.5. None when they
    cannot be read: loading the model then raises the error that names the missing weights.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    name = os.fspath(pretrained_model_name_or_path)
    try:
        transformer = SD3Transformer2DModel.load_config(
            name, subfolder="transformer", local_files_only=local_files_only
        )
        vae = AutoencoderKL.load_config(name, subfolder="vae", local_files_only=local_files_only)
        patch_size = int(transformer["patch_size"])
        vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return vae_scale_factor * patch_size, vae_scale_factor, patch_size

"""marble's ``LightningCLI``: the module, the data, resume rules and one-line errors.

Imported by :mod:`marble_pl.cli` only after :mod:`marble_pl.precheck` has checked the command
(this module pulls in torch, Lightning and diffusers). Configs are read in jsonargparse's
``omegaconf+`` mode with absolute interpolation paths made relative, so ``${data.val_file}``
resolves AFTER every config and command-line override (``--data.val_file x.txt`` moves the
sample grid's prompts too).
"""

from __future__ import annotations

import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from marble_pl.checks import check_run_folder
from marble_pl.errors import ConfigError
from marble_pl.precheck import UsageError
from marble_pl.resume import plan_resume, run_root

__all__ = ["MarbleArgumentParser", "MarbleCLI", "check_shared_settings", "say"]

PARSER_MODE = "omegaconf+"
"""jsonargparse's OmegaConf mode that resolves ``${...}`` after all configs and overrides merge."""


def one_line_usage_error(message: str) -> str:
    """jsonargparse's multi-line error as one line: the key, and the last reason it gives."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid arguments: run `marble fit --help`"
    reasons = [line.lstrip("- ") for line in lines[1:] if line.startswith("- ")]
    if reasons:  # a union: the last subtype's reason is the informative one
        given = next((line for line in lines if line.startswith("Given value:")), "")
        text = f"{lines[0].rstrip(':')}: {reasons[-1]}" + (f" ({given})" if given else "")
    else:
        text = ": ".join(line.rstrip(":") for line in lines)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"\s+", " ", text)
    return f"{text}; `marble fit --help` lists the options"


class MarbleArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors are one line (``marble: error: ...``), not a usage page."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        raise UsageError(one_line_usage_error(message)) from ex


@rank_zero_only
def say(message: str) -> None:
    """One line on stderr from global rank 0: ``marble: <message>``."""
    sys.stderr.write(f"marble: {message}\n")
    sys.stderr.flush()


def _class_path(spec: Any) -> str:
    """The ``class_path`` of a callback / logger config entry ('' when it is something else)."""
    if isinstance(spec, Namespace | dict):
        value = (
            spec.get("class_path") if isinstance(spec, dict) else getattr(spec, "class_path", None)
        )
        return str(value or "")
    return type(spec).__module__ + "." + type(spec).__qualname__


def check_shared_settings(cfg: Namespace) -> None:
    """A setting both the model and the data module take (``seed``) must have one value.

    Lightning logs the two classes' hyperparameters as one set and stops with a stack trace,
    after the models are loaded, when a shared key has two values.
    """
    model, data = cfg.get("model"), cfg.get("data")
    if not isinstance(model, Namespace) or not isinstance(data, Namespace):
        return
    for key in sorted(set(model.keys()) & set(data.keys())):
        if "." not in key and model.get(key) != data.get(key):
            raise ConfigError(
                f"model.{key} ({model.get(key)!r}) and data.{key} ({data.get(key)!r}) differ: "
                f"the logger records both as the one hyperparameter {key!r}; give them the "
                f"same value (e.g. --model.{key}={data.get(key)!r})"
            )


def remove_empty_run(log_dir: Path) -> None:
    """Delete a run folder that holds no checkpoint, LoRA or sample (only logs and config)."""
    if not log_dir.is_dir():
        return
    kept = [
        p
        for p in log_dir.rglob("*")
        if p.is_file() and p.suffix in (".ckpt", ".png", ".safetensors")
    ]
    if not kept:
        shutil.rmtree(log_dir, ignore_errors=True)


def check_max_steps(subcommand: str, max_steps: Any, max_epochs: Any) -> None:
    """``fit`` with ``max_steps: 0`` (or ``max_epochs: 0``) trains nothing: say so, do not exit 0."""
    if subcommand == "fit" and (max_steps == 0 or max_epochs == 0):
        key = "max_steps" if max_steps == 0 else "max_epochs"
        raise ConfigError(
            f"trainer.{key} is 0: `marble fit` would train nothing; give a positive number "
            "(or -1 for no limit), or use `marble validate` to only evaluate"
        )


def check_accelerator(accelerator: Any, devices: Any) -> None:
    """A GPU config on a machine without one (or with fewer GPUs) is one line, not Lightning's
    ``MisconfigurationException`` traceback after the config is parsed."""
    import torch

    name = str(getattr(accelerator, "class_path", accelerator) or "auto").lower()
    if name not in ("gpu", "cuda") and not name.endswith("cudaaccelerator"):
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found == 0:
        raise ConfigError(
            f"trainer.accelerator is {name!r} but this machine has no CUDA GPU (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): run on a GPU machine "
            "with a CUDA build of torch (the Dockerfile's image), or try the config on the CPU "
            "with --trainer.accelerator cpu --trainer.precision 32-true (and --random-weights "
            "where the weights are not here)"
        )
    wanted = devices if isinstance(devices, int) else None
    if isinstance(devices, str) and devices.strip().isdigit():
        wanted = int(devices)
    if wanted is not None and wanted > found:
        raise ConfigError(
            f"trainer.devices is {wanted} but this machine has {found} CUDA GPU(s): set "
            f"--trainer.devices {found} (or -1 for all)"
        )


class MarbleCLI(LightningCLI):
    """``LightningCLI`` with marble-pl's module, data module, resume rules and progress bar."""

    current: MarbleCLI | None = None  # the running CLI, for the SIGTERM exit message

    def __init__(self, *args: Any, parser_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        """As ``LightningCLI``; configs are parsed in :data:`PARSER_MODE` unless told otherwise,
        with marble's one-line errors."""
        parser_kwargs = dict(parser_kwargs or {})
        parser_kwargs.setdefault("parser_mode", PARSER_MODE)
        if parser_kwargs["parser_mode"] == "omegaconf+":  # ${data.x} inside fit: relative
            set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        kwargs.setdefault("parser_class", MarbleArgumentParser)
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "marble"},
                },
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Marble's resume rules instead of Lightning's, which overwrite ``--model.*`` values
        with the checkpoint's hyperparameters without a word (:mod:`marble_pl.resume`)."""
        MarbleCLI.current = self
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        ckpt = cfg.get("ckpt_path")
        callbacks = cfg.trainer.get("callbacks") or []
        if (
            subcommand == "fit"
            and not ckpt
            and any(_class_path(cb).endswith("OnExceptionCheckpoint") for cb in callbacks)
        ):
            raise ConfigError(
                "Lightning's OnExceptionCheckpoint makes every later `marble fit` silently "
                "resume its file: use marble_pl.callbacks.InterruptCheckpoint instead (it "
                "writes into the run's own checkpoints/ folder; resume with --ckpt_path)"
            )
        if not ckpt:
            return
        plan = plan_resume(str(ckpt), cfg.as_dict(), training=subcommand == "fit")
        cfg.ckpt_path = None if plan.ckpt_path is None else str(plan.ckpt_path)
        logger = cfg.trainer.get("logger")
        if plan.version is not None and isinstance(logger, Namespace):
            init_args = logger.get("init_args")
            if init_args is not None and init_args.get("version") is None:
                init_args.version = plan.version  # continue in the run's own folder
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* not empty")
        if plan.message:
            say(plan.message)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a NEW run that fails before its first step leaves no version folder behind
        (the next run would otherwise become version_N+1 beside an empty one)."""
        log_dir = self._new_run_dir(subcommand)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if log_dir is not None and self.trainer.global_step == 0:
                remove_empty_run(log_dir)
            raise

    def _new_run_dir(self, subcommand: str) -> Path | None:
        """The log folder this ``fit`` will create (None: it exists already, or no logger)."""
        logger = self.trainer.logger
        if subcommand != "fit" or logger is None or not self.trainer.is_global_zero:
            return None
        try:
            log_dir = Path(logger.log_dir)
        except (AttributeError, TypeError):
            return None
        return None if log_dir.exists() else log_dir

    def before_instantiate_classes(self) -> None:
        """Check the run folder is writable and add marble's progress bar, before any model."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        check_shared_settings(self.config[subcommand])
        trainer = self.config[subcommand].trainer
        check_max_steps(subcommand, trainer.get("max_steps"), trainer.get("max_epochs"))
        check_accelerator(trainer.get("accelerator"), trainer.get("devices"))
        root = run_root(trainer.get("logger"), trainer.get("default_root_dir"))
        check_run_folder(root if root is not None else trainer.get("default_root_dir") or ".")
        callbacks = trainer.get("callbacks") or []
        has_bar = any("ProgressBar" in _class_path(cb) for cb in callbacks)
        if trainer.get("enable_progress_bar") is not False and not has_bar:
            from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

            name = "MarbleProgressBar" if _RICH_AVAILABLE else "MarbleTQDMProgressBar"
            bar = Namespace(class_path=f"marble_pl.callbacks.{name}", init_args=Namespace())
            trainer.callbacks = [*callbacks, bar]

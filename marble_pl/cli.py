"""The ``marble`` command: Lightning's CLI over :class:`MarbleModule` and the prompt data.

``marble fit --config configs/tiny.yaml``, ``marble validate --config ... --ckpt_path ...``,
``marble fit --print_config``; every class is configured from YAML by ``class_path`` /
``init_args``, as with any ``LightningCLI``. Configs are read in jsonargparse's ``omegaconf+``
mode, so a value can interpolate another (``prompt_file: ${data.val_file}``) after every
override is applied. What marble adds to Lightning's CLI:

- resuming is explicit (:mod:`marble_pl.resume`): a plain ``fit`` starts a new run;
- user errors print one line, ``marble: error: ...``, and exit with code 2;
- ``--random-weights`` is short for ``--model.random_weights=true`` (real architectures, random
  weights, nothing downloaded: :mod:`marble_pl.random_weights`); ``marble preflight`` reports
  them and times a few steps (:mod:`marble_pl.preflight`);
- a run stopped by ``SIGTERM`` (or a signal ``PreemptionSignal`` forwards) exits with
  ``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1) after its checkpoint is written.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from marble_pl.checks import check_run_folder
from marble_pl.data import PromptDataModule
from marble_pl.errors import EXIT_USAGE, ConfigError, MarbleUserError
from marble_pl.module import MarbleModule
from marble_pl.notices import install_notice_filters
from marble_pl.resume import plan_resume, run_root

__all__ = ["MarbleCLI", "main"]

PARSER_MODE = "omegaconf"
"""jsonargparse's OmegaConf mode that resolves ``${...}`` after all configs and overrides merge."""


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


RANDOM_WEIGHTS_FLAG = "--random-weights"
RANDOM_WEIGHTS_ARG = "--model.random_weights=true"
"""``marble fit --random-weights``: every model at its real architecture with random weights."""


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


class MarbleCLI(LightningCLI):
    """``LightningCLI`` with marble-pl's module, data module, resume rules and progress bar."""

    current: MarbleCLI | None = None  # the running CLI, for the SIGTERM exit message

    def __init__(self, *args: Any, parser_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        """As ``LightningCLI``; configs are parsed in :data:`PARSER_MODE` unless told otherwise."""
        parser_kwargs = dict(parser_kwargs or {})
        parser_kwargs.setdefault("parser_mode", PARSER_MODE)
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

    def before_instantiate_classes(self) -> None:
        """Check the run folder is writable and add marble's progress bar, before any model."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        check_shared_settings(self.config[subcommand])
        trainer = self.config[subcommand].trainer
        root = run_root(trainer.get("logger"), trainer.get("default_root_dir"))
        check_run_folder(root if root is not None else trainer.get("default_root_dir") or ".")
        callbacks = trainer.get("callbacks") or []
        has_bar = any("ProgressBar" in _class_path(cb) for cb in callbacks)
        if trainer.get("enable_progress_bar") is not False and not has_bar:
            from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

            name = "MarbleProgressBar" if _RICH_AVAILABLE else "MarbleTQDMProgressBar"
            bar = Namespace(class_path=f"marble_pl.callbacks.{name}", init_args=Namespace())
            trainer.callbacks = [*callbacks, bar]


def _debug() -> bool:
    """``MARBLE_DEBUG=1`` shows the full traceback of user errors too."""
    return os.environ.get("MARBLE_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def _user_error(err: BaseException) -> MarbleUserError | None:
    """``err`` or the first :class:`MarbleUserError` it was raised from (``__cause__`` /
    ``__context__``): jsonargparse re-raises a callback's ``__init__`` error as its own."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, MarbleUserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _interrupted_exit_code() -> int:
    """``128 + signal``: the signal that stopped the run (``PreemptionSignal`` records its own)."""
    from marble_pl.callbacks.preemption import PreemptionSignal

    signum = PreemptionSignal.received or signal.SIGTERM
    return 128 + int(signum)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``marble`` console script: user errors become one line, exit code 2.

    A :class:`~marble_pl.errors.MarbleUserError` (bad config value, input file, weights,
    checkpoint) is printed as ``marble: error: <what, and the fix>``; ``MARBLE_DEBUG=1`` re-raises
    it with its traceback. A run stopped by a signal exits ``128 + signal`` after its checkpoint.
    """
    try:
        _main(args)
    except Exception as err:  # a user error, possibly wrapped by jsonargparse (callback args)
        user = _user_error(err)
        if user is None or _debug():
            raise
        message = " ".join(str(user).split())
        sys.stderr.write(f"marble: error: {message}\n")
        raise SystemExit(EXIT_USAGE) from None
    except SIGTERMException:
        code = _interrupted_exit_code()
        cli = MarbleCLI.current
        trainer = getattr(cli, "trainer", None) if cli is not None else None
        step = f" at step {trainer.global_step}" if trainer is not None else ""
        name = signal.Signals(code - 128).name
        say(
            f"stopped by {name}{step} (exit code {code}); resume with the same command plus "
            "--ckpt_path last"
        )
        raise SystemExit(code) from None


def _main(args: list[str] | None = None) -> None:
    """``marble fit|validate|...`` (LightningCLI), ``marble export ...`` (LoRA export) or
    ``marble preflight ...`` (real architectures, random weights, timed steps)."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list | tuple) and argv and argv[0] == "export":
        from marble_pl.export import main as export_main

        raise SystemExit(export_main(list(argv[1:])))
    if isinstance(argv, list | tuple) and argv and argv[0] == "preflight":
        from marble_pl.preflight import main as preflight_main

        install_notice_filters()
        raise SystemExit(preflight_main(list(argv[1:])))
    install_notice_filters()
    if isinstance(argv, list | tuple) and RANDOM_WEIGHTS_FLAG in argv:  # the short spelling
        spelled = [RANDOM_WEIGHTS_ARG if a == RANDOM_WEIGHTS_FLAG else a for a in argv]
        if args is None:
            sys.argv = [sys.argv[0], *spelled]
        else:
            args = spelled
    MarbleCLI(
        MarbleModule,
        PromptDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()

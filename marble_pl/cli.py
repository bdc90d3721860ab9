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
from typing import Any

from marble_pl.errors import EXIT_USAGE, MarbleUserError
from marble_pl.precheck import precheck

__all__ = ["MarbleCLI", "main"]  # noqa: F822  (MarbleCLI: lazily, see __getattr__)

RANDOM_WEIGHTS_FLAG = "--random-weights"
RANDOM_WEIGHTS_ARG = "--model.random_weights=true"
"""``marble fit --random-weights``: every model at its real architecture with random weights."""

TOOLS = {
    "export": ("marble_pl.export", False),
    "preflight": ("marble_pl.preflight", True),
    "evaluate": ("marble_pl.evaluate", True),
}
"""``marble <tool> ...`` beside Lightning's subcommands: its module (with a ``main(argv)``), and
whether library notices are filtered as for ``fit``."""


def __getattr__(name: str) -> Any:
    """``MarbleCLI`` and friends, imported on first use: they pull in torch and Lightning, which
    the one-line answer to a typo does not need (:mod:`marble_pl.precheck`)."""
    if name in ("MarbleCLI", "MarbleArgumentParser", "check_shared_settings", "say", "PARSER_MODE"):
        from marble_pl import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _interpolation_error(err: BaseException) -> MarbleUserError | None:
    """An OmegaConf ``${...}`` that cannot be resolved, as a user error naming key and value."""
    if not type(err).__module__.startswith("omegaconf"):
        return None
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    key = key.split(".", 1)[1] if key.split(".")[0] in ("fit", "validate", "test") else key
    where = f" in {key}" if key else ""
    return MarbleUserError(
        f"config interpolation{where} cannot be resolved: {lines[0] if lines else err} (an "
        "interpolation ${a.b} names another setting by its full key, e.g. ${data.val_file})"
    )


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
        user = _user_error(err) or _interpolation_error(err)
        if user is None or _debug():
            raise
        message = " ".join(str(user).split())
        sys.stderr.write(f"marble: error: {message}\n")
        raise SystemExit(EXIT_USAGE) from None
    except BaseException as err:
        if type(err).__name__ != "SIGTERMException":  # Lightning's; not imported until here
            raise
        from marble_pl.lightning_cli import MarbleCLI, say

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
    """``marble fit|validate|...`` (LightningCLI), ``marble export ...`` (LoRA export),
    ``marble preflight ...`` (real architectures, random weights, timed steps) or
    ``marble evaluate ...`` (GenEval, OCR and PickScore benchmarks: :mod:`marble_pl.evaluate`)."""
    argv = sys.argv[1:] if args is None else args
    listed = isinstance(argv, list | tuple)
    if listed and argv and argv[0] in TOOLS:
        import importlib

        from marble_pl.notices import install_notice_filters

        module, notices = TOOLS[argv[0]]
        if notices:
            install_notice_filters()
        raise SystemExit(importlib.import_module(module).main(list(argv[1:])))
    if listed:
        spelled = [RANDOM_WEIGHTS_ARG if a == RANDOM_WEIGHTS_FLAG else a for a in argv]
        precheck(spelled)
        if RANDOM_WEIGHTS_FLAG in argv:  # the short spelling
            if args is None:
                sys.argv = [sys.argv[0], *spelled]
            else:
                args = spelled
    from marble_pl.data import PromptDataModule
    from marble_pl.lightning_cli import MarbleCLI
    from marble_pl.module import MarbleModule
    from marble_pl.notices import install_notice_filters

    install_notice_filters()
    MarbleCLI(
        MarbleModule,
        PromptDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()

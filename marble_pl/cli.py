"""The ``marble`` command: Lightning's CLI over :class:`MarbleModule` and the prompt data.

``marble fit --config configs/tiny.yaml``, ``marble validate --config ... --ckpt_path ...``,
``marble fit --print_config``; every class is configured from YAML by ``class_path`` /
``init_args``, as with any ``LightningCLI``.
"""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from marble_pl.data import PromptDataModule
from marble_pl.errors import EXIT_USAGE, MarbleUserError
from marble_pl.module import MarbleModule

__all__ = ["MarbleCLI", "main"]


class MarbleCLI(LightningCLI):
    """``LightningCLI`` with marble-pl's module and data module as the defaults."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "marble"},
                },
            }
        )


# Lightning warnings that are expected here, not the user's problem: the VAE and text encoders
# stay in eval mode on purpose, and checkpoints are taken after the manual optimizer step.
_EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*ModelCheckpoint with manual optimization and every_n_train_steps.*",
)


def _debug() -> bool:
    """``MARBLE_DEBUG=1`` shows the full traceback of user errors too."""
    return os.environ.get("MARBLE_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``marble`` console script: user errors become one line, exit code 2.

    A :class:`~marble_pl.errors.MarbleUserError` (bad config value, input file, weights,
    checkpoint) is printed as ``marble: error: <what, and the fix>``; ``MARBLE_DEBUG=1`` re-raises
    it with its traceback.
    """
    try:
        _main(args)
    except MarbleUserError as err:
        if _debug():
            raise
        message = " ".join(str(err).split())
        sys.stderr.write(f"marble: error: {message}\n")
        raise SystemExit(EXIT_USAGE) from None


def _main(args: list[str] | None = None) -> None:
    """``marble fit|validate|...`` (LightningCLI) or ``marble export ...`` (LoRA export)."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list | tuple) and argv and argv[0] == "export":
        from marble_pl.export import main as export_main

        raise SystemExit(export_main(list(argv[1:])))
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    MarbleCLI(
        MarbleModule,
        PromptDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()

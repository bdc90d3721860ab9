"""User-facing errors: what went wrong and the fix, printed by ``marble`` as one line.

Every error a user can fix (a config value, an input file, missing weights, a checkpoint) derives
from :class:`MarbleUserError`. The ``marble`` command prints it as ``marble: error: <message>``
and exits with :data:`EXIT_USAGE` (2), without a traceback unless ``MARBLE_DEBUG=1``. Each class
also derives from the builtin exception of its kind (``ValueError``, ``OSError``, ...) so code
that catches those keeps working.
"""

from __future__ import annotations

__all__ = [
    "EXIT_USAGE",
    "CheckpointError",
    "ConfigError",
    "MarbleUserError",
    "RunFolderError",
]

EXIT_USAGE = 2
"""Exit code of a config or input error (as ``argparse`` uses for a bad command line)."""


class MarbleUserError(Exception):
    """Base of every error whose message names the problem and the fix (no traceback needed)."""


class ConfigError(MarbleUserError, ValueError):
    """A setting is out of range or inconsistent with another one."""


class CheckpointError(MarbleUserError, OSError):
    """A checkpoint is missing, unreadable, or does not fit the configured run."""


class RunFolderError(MarbleUserError, OSError):
    """The run folder (logs, checkpoints) cannot be created or written."""

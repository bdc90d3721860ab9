"""Build a saved pipeline folder atomically: into a sibling temp directory, then renamed into
place, so a reader never sees a partial folder. Shared by the tiny SD3 and the tiny FLUX."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

__all__ = ["ensure_built"]


def _rename_into_place(src: Path, out: Path) -> bool:
    """Atomically rename ``src`` to a missing or empty ``out``; False when ``out`` holds files."""
    with suppress(OSError):  # only an empty directory goes; racing another builder is harmless
        out.rmdir()
    try:
        os.rename(src, out)
    except OSError:
        if not out.is_dir():
            raise
        return False
    return True


def _replace_components(src: Path, out: Path) -> None:
    """Move each built entry over its namesake in ``out`` (other files stay), model_index last.

    The stale model_index.json goes first, so a crash in between leaves a folder that the
    completeness test rejects.
    """
    (out / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(src.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.rename(entry, target)


def ensure_built(
    path: str | os.PathLike[str],
    build: Callable[[Path], Any],
    is_complete: Callable[[Path], bool],
    *,
    what: str,
    error: Callable[[str], Exception],
) -> Path:
    """Run ``build(tmp)`` and rename it to ``path`` unless ``is_complete(path)`` already.

    A half-written ``path`` is rebuilt (its foreign files kept); ``error`` (naming ``what``) is
    raised when the build itself writes an incomplete folder. Losing a race to another builder
    that completed ``path`` is not an error.
    """
    out = Path(path)
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        if not is_complete(tmp):
            raise error(
                f"Building the {what} at {out} wrote an incomplete folder (under "
                "torch.distributed, transformers saves on global rank 0 only: build it there)."
            )
        if not _rename_into_place(tmp, out) and not is_complete(out):
            _replace_components(tmp, out)  # a half-written folder, or one with other files
    except OSError:
        if not is_complete(out):  # not another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

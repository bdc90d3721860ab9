"""Print one of the README's two set-up commands (``main`` or ``test``), exactly as written.

They are the two lines of the first ``bash`` block under ``## Set-up``: the one that runs
``marble fit`` and the one that runs ``pytest``. CI runs the test command through this script, so
the README's command is the one CI proves, byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def setup_commands(text: str) -> dict[str, str]:
    """``{"main": ..., "test": ...}`` from the first bash block of the ``## Set-up`` section."""
    section = text.split("\n## Set-up", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    if len(lines) != 2:
        raise SystemExit(f"README.md: the Set-up block must hold exactly two commands, got {lines}")
    main, test = lines
    if "marble fit" not in main or "pytest" not in test:
        raise SystemExit(
            f"README.md: expected the `marble fit` command then the tests, got {lines}"
        )
    return {"main": main, "test": test}


if __name__ == "__main__":
    print(setup_commands(README.read_text(encoding="utf-8"))[sys.argv[1]])

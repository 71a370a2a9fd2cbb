"""The ``sharded-counter`` console script: the command line, or how to install it.

The command line's own dependencies (click, rich) come with the ``cli`` extra, not
with the library; this module imports none of them until it knows they are there.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

# What each extra adds that the commands import.
_NEEDED = {"click": "cli", "rich": "cli"}


def missing_extras() -> dict[str, str]:
    """The modules the command line needs that are not installed, with their extra."""
    return {
        module: extra for module, extra in _NEEDED.items() if not importlib.util.find_spec(module)
    }


def main(**options: Any) -> None:
    """Run the command line, or say in one line which extra to install and exit 2."""
    missing = missing_extras()
    if missing:
        extras = ",".join(sorted(set(missing.values())))
        print(
            f"sharded-counter: the command line needs {', '.join(sorted(missing))}, "
            f"which the library does not: pip install 'sharded-counter[{extras}]'",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from .cli import main as command_line

    command_line(**options)

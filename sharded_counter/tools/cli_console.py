"""How the ``sharded-counter`` commands print, and how they fail: one line, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from rich.console import Console

from ..errors import ShardedCounterError


def stdout() -> Console:
    # Made per call so that it writes to whatever sys.stdout is now (CliRunner swaps it).
    return Console(highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    Console(stderr=True, highlight=False).print(message, style="red", markup=False, soft_wrap=True)
    raise SystemExit(code)


def backend_errors() -> tuple[type[BaseException], ...]:
    """What a misconfigured or unreachable backend raises, besides our own errors."""
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError

    # OSError: the Datastore client says "Project was not passed and could not be
    # determined from the environment" as an EnvironmentError.
    return (GoogleAPIError, GoogleAuthError, OSError)


@contextmanager
def clean_errors(context: str = "error") -> Iterator[None]:
    """Turn the errors a user can cause or fix into one line on stderr and exit status 1."""
    try:
        yield
    except (TypeError, ValueError, ShardedCounterError) as exc:
        fail(f"{context}: {exc}")
    except backend_errors() as exc:
        fail(f"{context}: {type(exc).__name__}: {exc}".splitlines()[0])

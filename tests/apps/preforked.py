"""A WSGI app as pre-forking servers load it: a module-level ``Counter`` and
``SharedBuffer``, used once in the master at import (as a warm-up or a check at
start-up would), then served by forked workers (gunicorn ``--preload``).

``POST /hit`` adds 1 to both and answers 200 once both are kept; any error of
ours answers 500 with its name, so the load test can tell what failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from sharded_counter import Counter, ShardedCounterError, SharedBuffer

HITS = "preforked:hits"
BUFFERED = "preforked:buffered"

hits = Counter(HITS)
buffered = SharedBuffer(interval=0.5)

# Used before the fork: the master's connections exist when the workers are forked.
hits.get_count()
buffered.pending(BUFFERED)


def app(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/hit" and environ.get("REQUEST_METHOD") == "POST":
        try:
            hits.increment()
            buffered.increment(BUFFERED)
        except ShardedCounterError as exc:
            return _answer(start_response, "500 Internal Server Error", type(exc).__name__)
        return _answer(start_response, "200 OK", str(os.getpid()))
    if path == "/pid":
        return _answer(start_response, "200 OK", str(os.getpid()))
    return _answer(start_response, "404 Not Found", "not found")


def _answer(
    start_response: Callable[[str, list[tuple[str, str]]], Any], status: str, text: str
) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

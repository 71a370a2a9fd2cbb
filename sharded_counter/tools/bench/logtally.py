"""The library's warnings during a measurement, counted instead of scrolled past.

A contended one-entity counter logs a warning for every increment it had to
stash; hundreds of identical lines would bury the tables. They are counted
by message template and reported once per measurement (and in the JSON).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterator


class _Tally(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        # The template, not the message: one line per kind, however many counters.
        self.seen[str(record.msg)] += 1


@contextlib.contextmanager
def tally_warnings() -> Iterator[dict[str, int]]:
    """Count the ``sharded_counter`` logger's warnings while inside; the dict fills on exit."""
    logger = logging.getLogger("sharded_counter")
    handler = _Tally()
    counts: dict[str, int] = {}
    # With a handler of its own in place, logging's last-resort printer stays quiet.
    logger.addHandler(handler)
    try:
        yield counts
    finally:
        logger.removeHandler(handler)
        counts.update(handler.seen)

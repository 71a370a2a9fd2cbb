"""The library's warnings during a race, counted instead of scrolled past.

A contended one-entity counter logs a warning for every increment it had to
stash; hundreds of identical lines would bury the tables. The demo and the
bench count them by message template instead and report each kind once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterator


class WarningTally(logging.Handler):
    """The ``sharded_counter`` logger's warnings, by message template."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()
        # The first message of each template: what a reader is shown for the kind.
        self.examples: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        # The template, not the message: one line per kind, however many counters.
        template = str(record.msg)
        self.counts[template] += 1
        self.examples.setdefault(template, record.getMessage())


@contextlib.contextmanager
def tally_warnings() -> Iterator[WarningTally]:
    """Count the ``sharded_counter`` logger's warnings while inside."""
    logger = logging.getLogger("sharded_counter")
    tally = WarningTally()
    # With a handler of its own in place, logging's last-resort printer stays quiet.
    logger.addHandler(tally)
    try:
        yield tally
    finally:
        logger.removeHandler(tally)

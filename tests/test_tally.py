"""How the demo's and the bench's writer loop counts each outcome (tools/tally.py)."""

from __future__ import annotations

import threading
import time

from sharded_counter.errors import CacheUnavailable, IncrementNotRecorded, IncrementOutcomeUnknown
from sharded_counter.tools.tally import WriterTally


def test_each_outcome_is_counted_as_what_it_says_of_the_count() -> None:
    failed = ConnectionError("down")
    outcomes: list[BaseException | None] = [
        None,
        IncrementNotRecorded("c", 3, failed),  # hands back 2 acknowledged before it
        CacheUnavailable("a buffer's cas kept losing", maybe_applied=False),
        CacheUnavailable("sent, no answer", maybe_applied=True),
        IncrementOutcomeUnknown("c", 1, failed),
        None,
    ]
    stop = threading.Event()

    def increment() -> None:
        outcome = outcomes.pop(0)
        if not outcomes:
            stop.set()
        if outcome is not None:
            raise outcome

    tally = WriterTally()
    tally.write_until(increment, time.monotonic() + 60, stop=stop)
    assert (tally.acked, tally.not_recorded, tally.returned) == (2, 2, 2)
    # Only what may have landed is an unknown outcome.
    assert dict(tally.errors) == {"CacheUnavailable": 1, "IncrementOutcomeUnknown": 1}
    assert tally.expected == 0

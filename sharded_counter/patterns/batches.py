"""What one flush of a ``CounterBuffer`` writes: a batch, under an idempotency key of its own.

A flush takes a counter's pending amount as a *batch* and writes it as a keyed
increment (store/keyed.py). A batch that fails is retried later under the
same key, so one whose outcome was unknown is never written twice. Only a
batch that certainly never landed, on its last try, goes to delayed_incr
like any failed increment; if even that stash's outcome is unknown (the
double fault), the batch is dropped with an error log, since writing it
again could count it twice.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Iterable

from ..core.validation import INT64_MAX, INT64_MIN
from ..counter import Counter
from ..errors import IncrementNotRecorded, IncrementOutcomeUnknown

log = logging.getLogger("sharded_counter")


@dataclasses.dataclass
class Batch:
    """An amount one flush took, named by its own idempotency key until it is written."""

    amount: int
    key: str = dataclasses.field(default_factory=lambda: f"buffer-{secrets.token_hex(12)}")
    written: int = 0  # int64 parts of it written already (an amount may need several)
    attempts: int = 0
    doubtful: bool = False  # some attempt may have landed: only its key may write it now
    lost: bool = False  # its stash's outcome is unknown: nothing may write it again

    def parts(self) -> list[tuple[str, int]]:
        """The parts not written yet, each with its own key."""
        return [(f"{self.key}/{i}", part) for i, part in enumerate(int64_parts(self.amount))][
            self.written :
        ]


def write_batch(counter: Counter, batch: Batch, *, last_try: bool) -> None:
    """Write what of ``batch`` is not written yet, part by part (see the module docstring).

    Raises IncrementNotRecorded (nothing more landed; retry the batch) or
    IncrementOutcomeUnknown (retry it under its key only; or, with ``batch.lost``
    set, never).
    """
    for key, part in batch.parts():
        try:
            counter.increment(part, idempotency_key=key)
        except IncrementNotRecorded as refused:
            if batch.doubtful or not last_try:
                raise
            # Certainly never landed, under any attempt: memcache may keep it for a
            # later write, as it keeps any failed increment.
            try:
                counter._stash_or_raise(part, refused)
            except IncrementOutcomeUnknown as lost:
                batch.lost = True
                log.error(
                    "flush of %r: %d may or may not be counted (Datastore refused it and "
                    "memcache did not confirm keeping it); not retried, so it is never "
                    "counted twice: %s",
                    counter.name,
                    lost.delta,
                    lost,
                )
                raise
        batch.written += 1


def int64_parts(amount: int) -> Iterable[int]:
    """A pending sum may outgrow int64; a shard write may not."""
    while amount:
        part = max(INT64_MIN, min(INT64_MAX, amount))
        yield part
        amount -= part

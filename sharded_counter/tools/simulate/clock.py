"""Virtual time and seeded chance, for one simulated history at a time.

The protocol's steps read the clock (``time.time`` for tokens and deadlines,
``time.monotonic`` in tenacity's stop and in the shard picker) and draw at
random (``random`` for shards and backoff, ``secrets`` for tokens and claims).
While ``deterministic`` is in force, all of them answer from the simulation:
the clock is the simulator's, and every draw comes from the history's seed, so
one seed replays the same history. Single-threaded by design: nothing else in
the process may depend on the clock meanwhile.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import time
from collections.abc import Iterator

#: The Unix time a simulation starts at (2026-12-07 00:00 UTC): tokens carry it.
EPOCH = 1_796_601_600.0


class VirtualClock:
    """Seconds since the history began; only the scheduler moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return EPOCH + self.now

    def monotonic(self) -> float:
        return self.now


@contextlib.contextmanager
def deterministic(clock: VirtualClock, seed: int) -> Iterator[random.Random]:
    """Run with ``clock`` as the time and draws from ``seed``; yields the history's own
    ``random.Random`` (for the simulator's choices), apart from the protocol's draws."""
    saved_state = random.getstate()
    saved = (time.time, time.monotonic, secrets.token_hex)
    random.seed(seed)
    draws = random.Random(seed ^ 0x5EED)

    def token_hex(nbytes: int | None = None) -> str:
        return f"{random.getrandbits(8 * (nbytes or 32)):0{2 * (nbytes or 32)}x}"

    time.time, time.monotonic, secrets.token_hex = clock.time, clock.monotonic, token_hex
    try:
        yield draws
    finally:
        time.time, time.monotonic, secrets.token_hex = saved
        random.setstate(saved_state)

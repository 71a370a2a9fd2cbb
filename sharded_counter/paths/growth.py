"""How many shards this process spreads a counter's writes over: adaptive sharding.

A counter starts at its configured ``shards``. Each write tells this policy
whether it met contention on the way: a transaction aborted by another
writer of its shard, or a shard passed over because another process had
leased it (cache/leases.py). While more than ``GROW_AT`` of the recent writes
met contention, the count grows by half, at most once per ``SETTLE`` writes
(so each step is judged on writes made at the new count), up to
``max_shards``. After ``QUIET`` writes in a row without contention it shrinks
back a step, never below ``shards``.

Changing the count never loses a count: every read sums all of a counter's
shards, whatever count wrote them, and ``count = v`` fences the shards it does
not know of (store/shards.py). Each process decides for itself, from what
its own writes meet; the shards one process adds are simply ones the others
do not write to yet.

Transform writes (Firestore in Datastore mode) neither read nor lock a shard,
so they meet no contention the emulator shows; in production, Firestore's own
"too much contention" aborts count like any other abort.
"""

from __future__ import annotations

import math
import threading

#: Grow while more than this share of recent writes met contention.
GROW_AT = 0.1
#: How much one write moves that share (an exponential moving average: about the
#: last 20 writes).
WEIGHT = 0.05
#: Writes between two changes of the count.
SETTLE = 50
#: Writes in a row without contention before the count shrinks a step.
QUIET = 2000
#: Each step multiplies (or divides) the count by this.
STEP = 1.5


class ShardGrowth:
    """The shard count of one counter in this process (see the module docstring).
    Shared by its threads and tasks; every method is safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0  # 0: none chosen yet, the configured count is in use
        self._contended = 0.0  # the recent share of writes that met contention
        self._events = 0  # contention met since the last write reported
        self._since_change = 0
        self._quiet = 0  # writes in a row without contention

    def in_use(self, start: int, maximum: int) -> int:
        """The count new writes spread over: ``start`` (the configured ``shards``) or
        what growth made of it, never above ``max(start, maximum)``."""
        return min(max(start, self._count), max(start, maximum))

    def contended(self) -> None:
        """A write met contention (an abort, a leased shard passed over)."""
        with self._lock:
            self._events += 1

    def wrote(self, start: int, maximum: int) -> int | None:
        """A write committed; the new count when this changed it, else None."""
        with self._lock:
            current = self.in_use(start, maximum)
            met = self._events > 0
            self._events = 0
            self._contended += WEIGHT * ((1.0 if met else 0.0) - self._contended)
            self._quiet = 0 if met else self._quiet + 1
            self._since_change += 1
            if self._since_change < SETTLE:
                return None
            ceiling = max(start, maximum)
            if self._contended > GROW_AT and current < ceiling:
                chosen = min(ceiling, math.ceil(current * STEP))
            elif self._quiet >= QUIET and current > start:
                chosen = max(start, math.floor(current / STEP))
                self._quiet = 0
            else:
                return None
            self._count = chosen
            self._since_change = 0
            self._contended = 0.0  # judged afresh at the new count
            return chosen

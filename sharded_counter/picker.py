"""Which shard a write goes to.

Picking uniformly at random lets two writers in one process land on the same
shard, and on an optimistic engine one of them then aborts and retries. A
process knows which shards its own writers hold, so it hands each writer a
shard nobody here is writing (random among the free ones) and falls back to
any shard only when all are busy. Writers in other processes still collide
at random, but no more often than that.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .registry import PerCounter


class ShardPicker:
    """The shards of one counter that writers in this process are using right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: dict[int, int] = {}  # index -> writers on it
        #: Set once this process saw a shard of the counter past the transform
        #: limit and could not spread it back: its writes then use transactions.
        self.transforms_unsafe = False

    @contextmanager
    def pick(self, shards: int, prefer: int | None = None) -> Iterator[int]:
        """A shard for one write: ``prefer`` when given (even if busy), else a free one."""
        index = self._take(shards) if prefer is None else self._hold(prefer)
        try:
            yield index
        finally:
            with self._lock:
                left = self._busy[index] - 1
                if left:
                    self._busy[index] = left
                else:
                    del self._busy[index]

    def _hold(self, index: int) -> int:
        with self._lock:
            self._busy[index] = self._busy.get(index, 0) + 1
            return index

    def _take(self, shards: int) -> int:
        with self._lock:
            busy = self._busy
            index = random.randrange(shards)
            if index in busy and len(busy) < shards:
                # A few random tries find a free shard fast while most are free;
                # past that, scan from a random start.
                for _ in range(4):
                    index = random.randrange(shards)
                    if index not in busy:
                        break
                else:
                    start = random.randrange(shards)
                    index = next(
                        i % shards for i in range(start, start + shards) if i % shards not in busy
                    )
            busy[index] = busy.get(index, 0) + 1
            return index


_pickers: PerCounter[ShardPicker] = PerCounter(ShardPicker)


def picker_for(scope: str, name: str) -> ShardPicker:
    """The process-wide picker of one counter (shared by every Counter object of it)."""
    return _pickers.get((scope, name))

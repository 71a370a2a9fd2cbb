"""Writers of one cached record in this process, merging together.

Sixteen threads each running their own ``cas`` loop on one key mostly lose
races. Instead, whoever comes first merges what every writer waiting behind it
brought, in one round, and each writer returns once a round holding its part
is done (so a read after ``increment`` sees the write).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class MergeBatches(Generic[T]):
    """One batch per key while any writer is inside ``merge``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: dict[str, _Batch[T]] = {}

    def merge(self, key: str, items: Iterable[T], merge_now: Callable[[list[T]], None]) -> None:
        """Have ``items`` merged into ``key``: by this thread, with ``merge_now`` over every
        item waiting, or by the thread merging already. Returns once they are."""
        batch = self._join(key)
        with batch.changed:
            batch.pending.extend(items)
            batch.joined += 1
            ticket = batch.joined
            while batch.merged < ticket:
                if not batch.leading:
                    batch.leading = True
                    taken, upto, batch.pending = batch.pending, batch.joined, []
                    break
                batch.changed.wait()
            else:
                self._leave(key, batch)
                return
        try:
            merge_now(taken)
        finally:
            with batch.changed:
                batch.merged = max(batch.merged, upto)
                batch.leading = False
                batch.changed.notify_all()
                self._leave(key, batch)

    def _join(self, key: str) -> _Batch[T]:
        with self._lock:
            batch = self._batches.get(key)
            if batch is None:
                batch = self._batches[key] = _Batch()
            batch.users += 1
            return batch

    def _leave(self, key: str, batch: _Batch[T]) -> None:
        with self._lock:
            batch.users -= 1
            if batch.users == 0 and self._batches.get(key) is batch:
                del self._batches[key]


class _Batch(Generic[T]):
    """The writers of one key merging together."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.pending: list[T] = []
        self.joined = 0  # tickets handed out
        self.merged = 0  # every ticket up to this one is merged
        self.leading = False
        self.users = 0  # threads inside merge(); the batch is dropped at 0

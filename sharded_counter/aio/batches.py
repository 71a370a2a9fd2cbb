"""Tasks merging into one cached record together: cache/batches.py for asyncio.

Whoever comes first merges what every task waiting behind it brought, in one
round, and each task returns once a round holding its part is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class AsyncMergeBatches(Generic[T]):
    """One batch per key while any task is inside ``merge`` (one event loop)."""

    def __init__(self) -> None:
        self._batches: dict[str, _Batch[T]] = {}

    async def merge(
        self, key: str, items: Iterable[T], merge_now: Callable[[list[T]], Awaitable[None]]
    ) -> None:
        """Have ``items`` merged into ``key``: by this task, with ``merge_now`` over every
        item waiting, or by the task merging already. Returns once they are."""
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch()
        batch.users += 1
        try:
            batch.pending.extend(items)
            batch.joined += 1
            ticket = batch.joined
            while batch.merged < ticket:
                if batch.leading:
                    await batch.changed.wait()
                    continue
                batch.leading = True
                taken, upto, batch.pending = batch.pending, batch.joined, []
                try:
                    await merge_now(taken)
                finally:
                    batch.merged = max(batch.merged, upto)
                    batch.leading = False
                    # Wake every waiter: each looks whether its ticket is merged now.
                    batch.changed.set()
                    batch.changed = asyncio.Event()
        finally:
            batch.users -= 1
            if batch.users == 0 and self._batches.get(key) is batch:
                del self._batches[key]


class _Batch(Generic[T]):
    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.pending: list[T] = []
        self.joined = 0  # tickets handed out
        self.merged = 0  # every ticket up to this one is merged
        self.leading = False
        self.users = 0

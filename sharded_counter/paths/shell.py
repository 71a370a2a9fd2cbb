"""The blocking shell: carries out the effects of steps (core/effects.py) in this thread.

``Counter`` and the other blocking APIs run their paths through a ``SyncShell``;
``aio/shell.py`` is the same for asyncio. Each effect is done the obvious way:
a Datastore call through the store's ``DatastoreRpc``, a memcache call (or a
pause, or a batched merge) through the cache tier, and steps side by side on
a few threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..cache.tier import CacheTier
from ..core.effects import Effect, Rpc, Steps, Together, drive
from ..store.calls import DatastoreCalls

T = TypeVar("T")

#: Most threads one ``Together`` runs on at once.
_MAX_TOGETHER = 8


class SyncShell:
    """Runs steps to their end in the calling thread, on ``store`` and ``cache``."""

    def __init__(self, store: DatastoreCalls, cache: CacheTier) -> None:
        self._store = store
        self._cache = cache

    def run(self, steps: Steps[T]) -> T:
        """Drive ``steps``: each effect's result is sent back, each error thrown in."""
        return drive(steps, self._perform)

    def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Rpc):
            return self._store.perform(effect)
        if isinstance(effect, Together):
            steps = list(effect.steps)
            if len(steps) <= 1:
                return [self.run(s) for s in steps]
            with ThreadPoolExecutor(max_workers=min(_MAX_TOGETHER, len(steps))) as pool:
                return list(pool.map(self.run, steps))
        return self._cache.perform(effect)

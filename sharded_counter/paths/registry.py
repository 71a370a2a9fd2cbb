"""Process-wide objects kept per counter (its picker, its write combiner).

Every ``Counter`` object of one counter in a process must share them: two
combiners of one counter would each keep a write in flight, and two pickers
would each lease shards, which is the contention they exist to avoid. So an
entry is never replaced while anything still uses it: the registry holds its
entries weakly, and holds strongly only the most recently used ``_RECENT``
(so that short-lived ``Counter('x')`` objects made per request still share
one). An entry that nothing uses and that has fallen out of the recent ones
is dropped; the next use makes a fresh one, which nothing else holds, so no
counter's protections are ever split. Memory stays bounded by the counters in
use plus ``_RECENT`` entries.

Emptied in a forked child (process.py), where a lock held by one of the
parent's threads would never be released.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from ..process import forget_at_fork

_T = TypeVar("_T")

#: Entries each registry keeps alive when nothing else uses them.
_RECENT = 10_000


class PerCounter(Generic[_T]):
    """One ``make()`` per key, shared by every thread of this process."""

    def __init__(self, make: Callable[[], _T], *, recent: int = _RECENT) -> None:
        self._make = make
        self._recent_cap = recent
        self._forget()
        _registries.add(self)

    def get(self, key: Hashable) -> _T:
        with self._lock:
            item = self._live.get(key)
            if item is None:
                item = self._live[key] = self._make()
            recent = self._recent
            recent[key] = item
            recent.move_to_end(key)
            if len(recent) > self._recent_cap:
                recent.popitem(last=False)  # still alive while anything else holds it
            return item

    def __len__(self) -> int:
        """Entries alive now: the recent ones and those still in use."""
        return len(self._live)

    def _forget(self) -> None:
        self._live: weakref.WeakValueDictionary[Hashable, _T] = weakref.WeakValueDictionary()
        self._recent: collections.OrderedDict[Hashable, _T] = collections.OrderedDict()
        self._lock = threading.Lock()


_registries: weakref.WeakSet[PerCounter[Any]] = weakref.WeakSet()


@forget_at_fork
def _forget_after_fork() -> None:
    for registry in list(_registries):
        registry._forget()

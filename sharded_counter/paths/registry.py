"""Process-wide objects kept per counter (its picker, its write combiner).

Bounded, so a process that touches millions of one-off counters does not
grow without end (past the bound it starts over: a fresh object for a busy
counter costs a little sharing, never correctness), and emptied in a forked
child, where a lock held by one of the parent's threads would never be released.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

_T = TypeVar("_T")

_LIMIT = 100_000


class PerCounter(Generic[_T]):
    """One ``make()`` per key, shared by every thread of this process."""

    def __init__(self, make: Callable[[], _T]) -> None:
        self._make = make
        self._items: dict[Hashable, _T] = {}
        self._lock = threading.Lock()
        _registries.add(self)

    def get(self, key: Hashable) -> _T:
        item = self._items.get(key)
        if item is None:
            with self._lock:
                item = self._items.get(key)
                if item is None:
                    if len(self._items) >= _LIMIT:
                        self._items.clear()
                    item = self._items[key] = self._make()
        return item

    def _forget(self) -> None:
        self._items = {}
        self._lock = threading.Lock()


_registries: weakref.WeakSet[PerCounter[Any]] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for registry in list(_registries):
        registry._forget()


os.register_at_fork(after_in_child=_forget_after_fork)

"""Counting the calls a contender makes to Datastore and memcache.

The library reaches Datastore through the ``DatastoreRpc`` it keeps on
``ShardStore.rpc`` (the high-level client keeps its generated client on
``Client._datastore_api_internal``), and memcache through ``CacheTier._client``.
Swapping a counting proxy in for one of those attributes, for the span of a
measurement, counts every round trip without touching the library, and the
same proxy works for both clients because both are plain method calls.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any


class CallCounter:
    """Calls made per method name, safe to bump from many threads.

    The lock costs well under a microsecond, against a millisecond or more
    per Datastore round trip; timings of sub-millisecond operations (the
    read micro-benchmarks) are taken without a proxy in the way.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._written = 0  # entities written or deleted by the commits counted

    def bump(self, method: str) -> None:
        with self._lock:
            self._counts[method] += 1

    def add_written(self, entities: int) -> None:
        with self._lock:
            self._written += entities

    def written(self) -> int:
        """Entities the counted commits wrote (their mutations, one entity each)."""
        with self._lock:
            return self._written

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))


class _CountingProxy:
    """Stands in for a client: every method call is counted, then passed through."""

    def __init__(self, target: Any, counter: CallCounter) -> None:
        self._target = target
        self._counter = counter

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if name.startswith("_") or not callable(attribute):
            return attribute
        counter = self._counter

        def counted(*args: Any, **kwargs: Any) -> Any:
            counter.bump(name)
            if name == "commit":
                counter.add_written(_mutations(args[0] if args else kwargs.get("request")))
            return attribute(*args, **kwargs)

        return counted


@contextlib.contextmanager
def counting(slots: Sequence[tuple[object, str]], counter: CallCounter) -> Iterator[CallCounter]:
    """Count calls through ``getattr(obj, attr)`` for each ``(obj, attr)`` while inside.

    The original clients are put back on the way out, even after an error.
    A slot holding None (a counter without memcache) is left alone.
    """
    swapped: list[tuple[object, str, Any]] = []
    try:
        for obj, attr in slots:
            original = getattr(obj, attr)
            if original is None:
                continue
            setattr(obj, attr, _CountingProxy(original, counter))
            swapped.append((obj, attr, original))
        yield counter
    finally:
        for obj, attr, original in reversed(swapped):
            setattr(obj, attr, original)


def _mutations(request: Any) -> int:
    """How many mutations a commit request carries: a protobuf, or the dict a
    high-level client passes its generated client."""
    if request is None:
        return 0
    if isinstance(request, dict):
        return len(request.get("mutations", ()))
    return len(getattr(request, "mutations", ()))


def per_call(calls: dict[str, int], operations: int) -> float | None:
    """Calls per operation, or None when nothing was done."""
    return sum(calls.values()) / operations if operations else None

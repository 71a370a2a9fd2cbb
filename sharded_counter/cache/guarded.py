"""The cache tier's way to memcache: every failure a ``CacheUnavailable``, and an outage
logged once when it starts and once when it ends.
"""

from __future__ import annotations

import time
from typing import Any

from pymemcache.exceptions import MemcacheClientError

from ..errors import CacheUnavailable
from .cas import Seen, as_seen
from .client import MemcacheClient, OutageLog
from .memcached.cluster import ServerUnavailable

# The calls that change what memcached holds: one that fails after it was sent may
# have been applied.
_WRITES = frozenset(
    {"add", "append", "cas", "set", "set_many", "incr", "decr", "delete", "delete_many"}
)


def _never_sent(exc: BaseException) -> bool:
    """Did the call fail before memcached could see it (refused, or its server is out),
    or did the server refuse it (``CLIENT_ERROR``; a full Redis's OOM error is a
    ``CacheCommandError``, a ``MemcacheClientError`` too), changing nothing?"""
    return isinstance(exc, (ConnectionRefusedError, ServerUnavailable, MemcacheClientError))


class GuardedClient:
    """Calls ``client`` (None: no memcached configured), turning each failure into
    ``CacheUnavailable``, whose ``maybe_applied`` says whether a write may have landed.

    ``client`` is looked up on every call, so whoever swaps it (the bench counts
    calls through a proxy put in its place) sees every call the tier makes.
    """

    def __init__(self, client: MemcacheClient | None) -> None:
        self.client = client
        self._outage = OutageLog(on_return="cached totals will rebuild from Datastore")

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._call(method, args, kwargs, heard=True)

    def send(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Make a ``noreply`` call: like ``call``, but its success is not taken for
        memcached answering (the bytes may only have reached a socket buffer), so it
        never ends an outage in the log."""
        self._call(method, args, {**kwargs, "noreply": True}, heard=False)

    def _call(self, method: str, args: Any, kwargs: Any, *, heard: bool) -> Any:
        client = self.client
        if client is None:
            raise CacheUnavailable("no memcached servers are configured (set MEMCACHED_HOSTS)")
        sent = time.monotonic()
        try:
            result = getattr(client, method)(*args, **kwargs)
        except Exception as exc:  # pymemcache raises socket errors and its own
            self._outage.failed(exc, "reading totals from Datastore until it returns")
            raise CacheUnavailable(
                f"memcache {method} failed: {exc}",
                maybe_applied=method in _WRITES and not _never_sent(exc),
            ) from exc
        if heard:
            self._outage.answered(sent)
        return result

    # -- the calls of cas.change_key, and the others the tier makes ----------------------

    def gets(self, key: str) -> Seen:
        return as_seen(self.call("gets", key))

    def add(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool:
        return self.call("add", key, value, expire, noreply=noreply) is True

    def cas(self, key: str, value: bytes, cas: Any, expire: int = 0, noreply: bool = False) -> Any:
        return self.call("cas", key, value, cas, expire, noreply=noreply)

    def append(self, key: str, value: bytes) -> bool:
        """Append ``value`` to ``key``'s value; False when the key does not exist."""
        return self.call("append", key, value, noreply=False) is True

    def delete(self, key: str) -> None:
        self.call("delete", key, noreply=False)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        # Straight to _call: this is every cached read's one call, and a frame less shows.
        found: dict[str, bytes] = self._call("get_many", (keys,), {}, heard=True)
        return found

    def gets_many(self, keys: list[str]) -> dict[str, tuple[bytes, Any]]:
        found: dict[str, tuple[bytes, Any]] = self.call("gets_many", keys)
        return found

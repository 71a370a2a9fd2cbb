"""Shard leases: a hint in memcache that a process is writing one shard right now.

Writers in one process already keep off each other's shards (paths/picker.py);
writers in different processes know nothing of each other. On the
pessimistic engine two transactions that read one shard and then both write
it wait on each other's locks until a lock timeout (2 s on the emulator), so a
transaction write first *leases* its shard with one memcached ``add``: a
process that finds the shard leased picks another. A lease is only a hint: it
expires by itself (a writer that died holds its shard for at most
``LEASE_SECONDS``), and with memcache down every lease is granted, so nothing
about exactness ever depends on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ..core.effects import Memcache, Steps
from ..errors import CacheUnavailable

#: How long a lease lasts if its holder never ends it (memcached counts whole seconds).
LEASE_SECONDS = 2


class ShardLeases:
    """Leases on shards (as steps); ``enabled`` says whether there is a memcache at all."""

    def __init__(self, enabled: Callable[[], bool]) -> None:
        self._enabled = enabled

    def take(self, key: str) -> Steps[bool | None]:
        """Lease ``key``: True when granted, False when another writer holds it, None when
        memcache could not say (then go ahead: it is only a hint)."""
        if not self._enabled():
            return None
        try:
            granted = yield Memcache("add", (key, b"1", LEASE_SECONDS, False))
        except CacheUnavailable:
            return None
        return granted is True

    def end(self, key: str) -> Steps[None]:
        """End a lease taken with ``take``. Never raises: it expires by itself."""
        with contextlib.suppress(CacheUnavailable):
            yield Memcache("send", ("delete", key))

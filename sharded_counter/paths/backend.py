"""Process-wide clients, shared by every Counter with the same settings.

A Datastore client holds a gRPC channel and a memcache client a pool of
sockets: both are costly to make and safe to share between threads, so each
is made once per distinct setting. After ``fork`` the child starts afresh,
since neither gRPC channels nor sockets survive being shared with a parent.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Any

from google.cloud import datastore

from ..cache.client import MemcacheClient, build_client
from ..cache.tier import CacheTier
from ..core.effects import Steps
from ..settings import Settings
from ..store.keyed import KeyedShardStore
from ..store.shards import ShardStore
from .shell import SyncShell


@dataclasses.dataclass
class Backend:
    """What a Counter talks to, and how it writes."""

    store: ShardStore
    cache: CacheTier
    requested_mode: str  # "auto", "transform" or "transaction"

    @functools.cached_property
    def shell(self) -> SyncShell:
        """Carries out the paths' steps in the calling thread, on this store and cache."""
        return SyncShell(self.store, self.cache)

    @functools.cached_property
    def keyed(self) -> KeyedShardStore:
        """The keyed write paths and key records (store/keyed.py), on the same store."""
        return KeyedShardStore(self.store)

    @property
    def write_mode(self) -> str:
        """ "transform" or "transaction"; the first call may probe the backend."""
        if self.requested_mode == "auto":
            return "transform" if self.is_firestore else "transaction"
        return self.requested_mode

    @property
    def lazy_begin(self) -> bool:
        """Begin transactions with their first read (a round trip fewer)?

        The Firestore engine aborts such transactions every time, so only elsewhere.
        """
        return not self.is_firestore

    def probed(self) -> Steps[None]:
        """Learn whether this engine applies transforms, if this process has not yet, as
        steps: the paths call it before they read ``write_mode``, ``lazy_begin`` or
        ``is_firestore``, so that no shell blocks on the probe (its failure is a
        Datastore call's failure, handled where the path handles those)."""
        if self.requested_mode != "auto" or transforms_known(self.store) is not None:
            return
        note_transforms(self.store, (yield from self.store.probe_transforms()))

    @property
    def is_firestore(self) -> bool:
        # Only Firestore in Datastore mode applies transforms: one probe tells both.
        return self.requested_mode == "transform" or _transforms_supported(self.store)


_lock = threading.Lock()
_datastore_clients: dict[tuple[Any, ...], datastore.Client] = {}
_memcache_clients: dict[tuple[Any, ...], MemcacheClient | None] = {}
_write_modes: dict[tuple[str, str], bool] = {}  # (scope, host) -> transforms supported
_backends: dict[tuple[Any, ...], Backend] = {}


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _datastore_clients.clear()
    _memcache_clients.clear()
    _backends.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def _emulator() -> tuple[str, str]:
    # The client reads these when it is made; a client made for one emulator
    # must not serve another (tests switch engines in one process).
    return os.environ.get("DATASTORE_EMULATOR_HOST", ""), os.environ.get("DATASTORE_DATASET", "")


def _datastore_client(settings: Settings) -> datastore.Client:
    key = (settings.project, settings.database, settings.namespace, *_emulator())
    client = _datastore_clients.get(key)
    if client is None:
        client = datastore.Client(  # type: ignore[no-untyped-call]
            project=settings.project, namespace=settings.namespace, database=settings.database
        )
        _datastore_clients[key] = client
    return client


def _memcache_client(settings: Settings) -> MemcacheClient | None:
    key = (settings.memcached_hosts, settings.memcache_timeout, settings.memcache_connect_timeout)
    if key not in _memcache_clients:
        _memcache_clients[key] = build_client(settings)
    return _memcache_clients[key]


def _transforms_supported(store: ShardStore) -> bool:
    """Probe once per backend; a probe that fails raises and is tried again next time."""
    known = transforms_known(store)
    if known is None:
        known = store.run(store.probe_transforms())
        note_transforms(store, known)
    return known


def transforms_known(store: ShardStore) -> bool | None:
    """What the probe found for this backend, if it ran (the asyncio shell runs its own)."""
    return _write_modes.get((store.scope, _emulator()[0]))


def note_transforms(store: ShardStore, supported: bool) -> None:
    _write_modes[(store.scope, _emulator()[0])] = supported


def backend_for(
    settings: Settings,
    datastore_client: datastore.Client | None = None,
    memcache_client: MemcacheClient | None = None,
) -> Backend:
    """The shared Backend for these settings, or a new one around the caller's clients."""
    key = (
        settings.project,
        settings.database,
        settings.namespace,
        settings.memcached_hosts,
        settings.memcache_timeout,
        settings.memcache_connect_timeout,
        settings.cache_ttl,
        settings.rpc_timeout,
        settings.write_mode,
        *_emulator(),
    )
    shareable = datastore_client is None and memcache_client is None
    with _lock:
        backend = _backends.get(key) if shareable else None
        if backend is not None:
            return backend
        store = ShardStore(
            datastore_client or _datastore_client(settings), rpc_timeout=settings.rpc_timeout
        )
        client = memcache_client if memcache_client is not None else _memcache_client(settings)
        backend = Backend(store, CacheTier(client, ttl=settings.cache_ttl), settings.write_mode)
        if shareable:
            _backends[key] = backend
        return backend

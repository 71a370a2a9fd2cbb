"""Process-wide clients, shared by every Counter with the same settings.

A Datastore client holds a gRPC channel and a memcache client a pool of
sockets: both are costly to make and safe to share between threads, so each
is made once per distinct setting. After ``fork`` the child starts afresh,
since neither gRPC channels nor sockets survive being shared with a parent.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from google.cloud import datastore

from .cache import CacheTier
from .config import Settings
from .memcache import MemcacheClient, build_client
from .shards import ShardStore


@dataclasses.dataclass
class Backend:
    """What a Counter talks to, and how it writes."""

    store: ShardStore
    cache: CacheTier
    write_mode: str  # "transform" or "transaction", decided once per store
    lazy_begin: bool  # begin transactions with the first read (saves a round trip)


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


def _datastore_client(settings: Settings) -> datastore.Client:
    key = (settings.project, settings.database, settings.namespace)
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
    key = (store.scope, os.environ.get("DATASTORE_EMULATOR_HOST", ""))
    if key not in _write_modes:
        _write_modes[key] = store.probe_transforms()
    return _write_modes[key]


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
        mode = settings.write_mode
        # Only Firestore in Datastore mode applies transforms, and the same engine
        # aborts a transaction begun lazily with its first read: one probe tells both.
        firestore = mode == "transform" or _transforms_supported(store)
        backend = Backend(
            store,
            CacheTier(client, ttl=settings.cache_ttl),
            write_mode="transform" if mode != "transaction" and firestore else "transaction",
            lazy_begin=not firestore,
        )
        if shareable:
            _backends[key] = backend
        return backend

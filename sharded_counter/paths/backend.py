"""Process-wide clients, shared by every Counter with the same settings.

A Datastore client holds a gRPC channel and a memcache client a pool of
sockets: both are costly to make and safe to share between threads, so each
is made once per distinct setting, on the first call that needs it (making a
client opens no connection; its first request does). A forked child, and
``reconnect()``, start afresh (process.py), since neither gRPC channels nor
sockets survive being shared with a parent.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import weakref
from typing import Any

import google.auth.exceptions
from google.cloud import datastore

from ..cache.client import MemcacheClient, build_client, cache_client_key
from ..cache.tier import CacheTier
from ..core.effects import Steps
from ..errors import ConfigurationError
from ..process import forget_at_fork, forget_connections
from ..settings import Settings
from ..store.keyed import KeyedShardStore
from ..store.rpc import memory_client
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
# (scope, emulator host, in-memory engine) -> transforms supported
_write_modes: dict[tuple[str, str, str | None], bool] = {}
_backends: dict[tuple[Any, ...], Backend] = {}


@forget_connections
def _forget_clients() -> None:
    _datastore_clients.clear()
    _memcache_clients.clear()
    _backends.clear()


@forget_at_fork
def _new_lock_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a parent's thread may have held it


def _emulator() -> tuple[str, str]:
    # The client reads these when it is made; a client made for one emulator
    # must not serve another (tests switch engines in one process).
    return os.environ.get("DATASTORE_EMULATOR_HOST", ""), os.environ.get("DATASTORE_DATASET", "")


def _datastore_client(settings: Settings) -> datastore.Client:
    key = (
        settings.project,
        settings.database,
        settings.namespace,
        *_emulator(),
        settings.datastore_url,
    )
    client = _datastore_clients.get(key)
    if client is None:
        client = _datastore_clients[key] = new_datastore_client(settings)
    return client


#: What to set when Datastore cannot be reached for want of credentials or a project.
CREDENTIALS_HELP = (
    "set DATASTORE_EMULATOR_HOST and DATASTORE_DATASET for an emulator; otherwise "
    "Google credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default "
    "login`, or a service account on Google Cloud) and a project (the `project` setting "
    "or GOOGLE_CLOUD_PROJECT); or pass datastore_client"
)


def new_datastore_client(settings: Settings) -> datastore.Client:
    """A Datastore client for ``settings`` (connecting on its first request).

    Raises ``ConfigurationError`` naming what to set when there are no credentials
    or no project to be found: google-auth's own errors are not ours to let out.
    A ``datastore_url`` of ``memory://`` gives a ``MemoryClient``, which needs neither.
    """
    if settings.datastore_url is not None:
        return memory_client(
            settings.datastore_url,
            project=settings.project,
            namespace=settings.namespace,
            database=settings.database,
        )
    try:
        return datastore.Client(  # type: ignore[no-untyped-call]
            project=settings.project, namespace=settings.namespace, database=settings.database
        )
    except google.auth.exceptions.GoogleAuthError as exc:
        raise ConfigurationError(
            f"Datastore has no credentials to use ({exc}): {CREDENTIALS_HELP}"
        ) from exc
    except OSError as exc:  # google-cloud-core's "Project was not passed ..." is an OSError
        raise ConfigurationError(
            f"Datastore has no project to use ({exc}): {CREDENTIALS_HELP}"
        ) from exc


def _memcache_client(settings: Settings) -> MemcacheClient | None:
    key = cache_client_key(settings)
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
    return _write_modes.get(_database_of(store))


def note_transforms(store: ShardStore, supported: bool) -> None:
    _write_modes[_database_of(store)] = supported


def _database_of(store: ShardStore) -> tuple[str, str, str | None]:
    """Which database a probe spoke to: the scope, at the emulator the environment names,
    or the engine of an in-memory one (memory/backends.py: two of one scope).

    Found once per store: its client was made for one emulator and keeps it, and every
    write asks (reading the environment twice per write cost a hundredth of its time)."""
    database = _databases.get(store)
    if database is None:
        memory = getattr(store.client, "memory", None)
        database = _databases[store] = (
            store.scope,
            _emulator()[0],
            getattr(memory, "engine", None),
        )
    return database


_databases: weakref.WeakKeyDictionary[ShardStore, tuple[str, str, str | None]] = (
    weakref.WeakKeyDictionary()
)


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
        *cache_client_key(settings),
        settings.cache_ttl,
        settings.rpc_timeout,
        settings.write_mode,
        *_emulator(),
        settings.datastore_url,
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

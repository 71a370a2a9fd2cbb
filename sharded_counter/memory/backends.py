"""The models of this package as backends of one process, for applications' tests.

``memory://`` as the cache (``cache_url``) and as Datastore (``datastore_url``) put
every counter, limit and buffer of this process on ``MemoryCache`` and
``MemoryDatastore``: the simulator's models (``cache.py``, ``datastore.py``) on the
real clock, behind a lock, shared by the threads and event loops of the process.
An application's unit tests then need no Java, emulator or memcached.

Not a production backend: nothing leaves the process (a forked worker starts with
a copy of its parent's items and shares nothing with it after), nothing is kept
when the process ends, and there is no limit on memory. ``docs/testing.md`` lists
what else the models do not do as the real services do.

Each name is one cache (``memory://`` and ``memory://other`` are two); Datastore
has one database per engine (``memory://`` is Firestore in Datastore mode, as
production is; ``memory://classic`` the classic engine). ``reset_memory()``
empties them all between tests.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import datastore
from pymemcache.client.base import check_key_helper

from ..errors import ConfigurationError
from .cache import MemcacheModel
from .datastore import CALLS, Blocked, DatastoreModel

#: The engines ``memory://<engine>`` names for Datastore; no name is ``firestore``.
ENGINES = ("firestore", "classic")


class MemoryCache:
    """One memcache in this process: the calls of the cache clients (pymemcache's, as
    the cache tier and the patterns use them), with memcached's meaning
    (``MemcacheModel``), safe to share between threads. Keys are checked as pymemcache
    checks them (at most 250 bytes, no spaces or control characters)."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._model = MemcacheModel(time.time)  # an expiry past 30 days is a Unix time
        self._lock = threading.Lock()

    def _call(self, method: str, keys: Iterable[str], *args: Any, **kwargs: Any) -> Any:
        for key in keys:
            check_key_helper(key, allow_unicode_keys=False)
        with self._lock:
            return getattr(self._model, method)(*args, **kwargs)

    def get(self, key: str, default: Any = None) -> Any:
        found = self._call("get", [key], key)
        return default if found is None else found

    def gets(self, key: str) -> tuple[bytes | None, Any]:
        value, cas = self._call("gets", [key], key)
        return value, _token(cas)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        answer: dict[str, bytes] = self._call("get_many", keys, keys)
        return answer

    def gets_many(self, keys: Iterable[str]) -> dict[str, tuple[bytes, Any]]:
        keys = list(keys)
        found: dict[str, tuple[bytes, Any]] = self._call("gets_many", keys, keys)
        return {key: (value, _token(cas)) for key, (value, cas) in found.items()}

    # With ``noreply`` each answers as pymemcache's client does, which hears nothing:
    # True for a store or a delete, None for incr and decr.

    def set(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool:
        return bool(self._call("set", [key], key, value, expire)) or noreply

    def add(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool:
        return bool(self._call("add", [key], key, value, expire)) or noreply

    def cas(
        self, key: str, value: bytes, cas: Any, expire: int = 0, noreply: bool = False
    ) -> bool | None:
        token = int(cas) if isinstance(cas, (bytes, str)) and cas.isdigit() else cas
        answer: bool | None = self._call("cas", [key], key, value, token, expire)
        return True if noreply else answer

    def append(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool:
        return bool(self._call("append", [key], key, value)) or noreply

    def delete(self, key: str, noreply: bool = False) -> bool:
        return bool(self._call("delete", [key], key)) or noreply

    def incr(self, key: str, value: int, noreply: bool = False) -> int | None:
        answer: int | None = self._call("incr", [key], key, value)
        return None if noreply else answer

    def decr(self, key: str, value: int, noreply: bool = False) -> int | None:
        answer: int | None = self._call("decr", [key], key, value)
        return None if noreply else answer

    def flush_all(self) -> None:
        with self._lock:
            self._model.flush_all()

    def close(self) -> None:
        """Nothing to close: the items stay for the next client of this name."""

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork


def _token(cas: Any) -> bytes | None:
    """A cas token as pymemcache hands one out: memcached's number, as bytes."""
    return None if cas is None else str(cas).encode()


class AsyncMemoryCache:
    """``MemoryCache`` for the asyncio shell (``aio/cache_guard.py``'s ``AsyncCache``):
    the same items as the threads of this process see, answered at once."""

    def __init__(self, cache: MemoryCache) -> None:
        self._cache = cache

    @property
    def enabled(self) -> bool:
        return True  # a cache is configured (AsyncMemcache's says whether servers are)

    async def close(self) -> None:
        self._cache.close()

    async def gets(self, key: str) -> tuple[bytes | None, Any]:
        return self._cache.gets(key)

    async def get(self, key: str) -> bytes | None:
        found: bytes | None = self._cache.get(key)
        return found

    async def add(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool:
        return self._cache.add(key, value, expire)

    async def cas(
        self, key: str, value: bytes, cas: Any, expire: int = 0, noreply: bool = False
    ) -> bool:
        # As the asyncio memcached client answers: False whether changed or gone.
        return self._cache.cas(key, value, cas, expire) is True

    async def append(self, key: str, value: bytes) -> bool:
        return self._cache.append(key, value)

    async def delete(self, key: str) -> None:
        self._cache.delete(key)

    async def send(self, method: str, key: str) -> None:
        getattr(self._cache, method)(key)

    async def incr(self, key: str, value: int, noreply: bool = False) -> int | None:
        return self._cache.incr(key, value)

    async def decr(self, key: str, value: int, noreply: bool = False) -> int | None:
        return self._cache.decr(key, value)

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        return self._cache.get_many(keys)

    async def gets_many(self, keys: list[str]) -> dict[str, tuple[bytes, Any]]:
        return self._cache.gets_many(keys)


class MemoryDatastore:
    """One Datastore database in this process (``DatastoreModel``), on the real clock,
    safe to share between threads and event loops. A call that waits for another
    transaction's lock (Firestore mode) waits here, as the real service holds it,
    and gives up as the model does: ``Aborted`` after its lock timeout (2 s), or
    ``DeadlineExceeded`` when the caller's ``timeout`` passes first."""

    def __init__(self, engine: str = "firestore") -> None:
        self.engine = engine
        self._changed = threading.Condition()
        self._model = self._new_model()

    def _new_model(self) -> DatastoreModel:
        model = DatastoreModel(self.engine)
        model.on_end.append(lambda _txn: self._changed.notify_all())  # under the lock
        return model

    def reset(self) -> None:
        """Drop every entity and transaction."""
        with self._changed:
            self._model = self._new_model()

    def _try(self, method: str, request: Any) -> Any:
        """The model's answer, or ``Blocked`` (its errors are the real service's)."""
        return self._model.call(method, request, time.monotonic())

    def call(self, method: str, request: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                try:
                    return self._try(method, request)
                except Blocked:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _deadline_exceeded() from None
                    # Woken when a transaction ends; asked again at least every 50 ms,
                    # so that the model's lock timeout is seen when it passes.
                    self._changed.wait(min(left, 0.05))

    async def call_async(self, method: str, request: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                try:
                    return self._try(method, request)
                except Blocked:
                    pass
            if time.monotonic() >= deadline:
                raise _deadline_exceeded()
            await asyncio.sleep(0.005)  # the loop's other tasks may hold the lock

    def _after_fork(self) -> None:
        self._changed = threading.Condition()  # another thread may have held it at the fork


def _deadline_exceeded() -> gexc.GoogleAPICallError:
    error: gexc.GoogleAPICallError = gexc.DeadlineExceeded("Deadline Exceeded")  # type: ignore[no-untyped-call]
    return error


class MemoryClient(datastore.Client):
    """A ``datastore.Client`` whose entities live in this process (``MemoryDatastore``).

    The counters' store sends its calls to ``memory`` instead of the network
    (``store/rpc.py``'s ``rpc_for``, ``aio/rpc.py``'s ``async_rpc_for``); it
    carries the project, database and namespace as any client does. The client's
    own methods (``get``, ``put``, ``delete``, transactions, and queries of one kind
    with equality filters) reach the same entities: a test may look at what the
    counters wrote. What the model does not do (``memory/datastore.py``: ids for
    incomplete keys, aggregation queries, cursors, indexes) raises
    ``NotImplementedError`` or is left out, as its docs say.
    """

    def __init__(
        self,
        engine: str = "firestore",
        *,
        project: str | None = None,
        namespace: str | None = None,
        database: str | None = None,
    ) -> None:
        # The client refuses credentials while DATASTORE_EMULATOR_HOST is set, and needs
        # none then; it never uses either here (its calls come to ``memory``).
        emulated = bool(os.environ.get("DATASTORE_EMULATOR_HOST"))
        super().__init__(  # type: ignore[no-untyped-call]
            project=project or "memory",
            namespace=namespace,
            database=database,
            credentials=None if emulated else AnonymousCredentials(),  # type: ignore[no-untyped-call]
        )
        self.memory = memory_datastore(engine)
        self._memory_api = _GeneratedApi(self.memory)

    @property
    def _datastore_api(self) -> Any:  # what the client's own methods call
        return self._memory_api


class _GeneratedApi:
    """The methods ``datastore.Client`` calls on its generated API (``lookup``,
    ``commit``, ``begin_transaction``, ``rollback``, ``run_query``), on proto-plus
    requests or dicts of them, answered by a ``MemoryDatastore``."""

    def __init__(self, database: MemoryDatastore) -> None:
        self._database = database

    def __getattr__(self, method: str) -> Any:
        types = CALLS.get(method)
        if types is None:
            raise NotImplementedError(f"the in-memory Datastore does not answer {method}")
        request_type, response_type = types
        database = self._database

        def call(request: Any = None, *, timeout: float | None = None, **_ignored: Any) -> Any:
            message = request_type(request) if isinstance(request, dict) else request
            raw = request_type.pb(message)
            return response_type.wrap(database.call(method, raw, timeout or 60.0))

        return call


_lock = threading.Lock()
_caches: dict[str, MemoryCache] = {}
_datastores: dict[str, MemoryDatastore] = {}


def memory_cache(name: str = "") -> MemoryCache:
    """This process's cache called ``name`` (``memory://name``), made on first use."""
    with _lock:
        found = _caches.get(name)
        if found is None:
            found = _caches[name] = MemoryCache(name)
        return found


def memory_datastore(engine: str = "firestore") -> MemoryDatastore:
    """This process's in-memory Datastore of ``engine``, made on first use."""
    engine = engine or "firestore"
    if engine not in ENGINES:
        raise ConfigurationError(
            f"memory:// Datastore engines are {', '.join(ENGINES)}, not {engine!r}"
        )
    with _lock:
        found = _datastores.get(engine)
        if found is None:
            found = _datastores[engine] = MemoryDatastore(engine)
        return found


def reset_memory() -> None:
    """Empty every in-memory cache and Datastore of this process (between tests)."""
    with _lock:
        for cache in _caches.values():
            cache.flush_all()
        for database in _datastores.values():
            database.reset()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for cache in _caches.values():
        cache._after_fork()
    for database in _datastores.values():
        database._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = [
    "AsyncMemoryCache",
    "MemoryCache",
    "MemoryClient",
    "MemoryDatastore",
    "memory_cache",
    "memory_datastore",
    "reset_memory",
]

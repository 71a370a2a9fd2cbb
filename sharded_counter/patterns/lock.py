"""Good-enough locks in memcache: ``with lock('crazy', ttl=10): ...``.

Taking a lock is ``add`` of a random token with an expiry of ``ttl`` seconds:
``add`` succeeds for one caller only, and a holder that dies frees the lock
when the TTL runs out.

Giving it back must not free someone else's lock. Suppose our TTL ran out
while we worked and another caller took the lock: a plain ``delete`` would
then free *their* lock. memcached has no compare-and-delete, so releasing
never deletes. It reads the lock with ``gets``; if the token is still ours it
``cas``-es the value to a *tombstone*, which fails if anything changed since
the read. A taker treats a tombstone as free and takes it over with ``cas``
too. Every step is thus a compare-and-swap, with no window in which a late
release could touch a newer holder's lock. (Deleting after a tombstone with a
short expiry would leave one: if the tombstone expired and someone took the
lock before our delete arrived, that delete would free their lock.)

What "good enough" leaves out:

* memcached counts expiry in whole seconds, so a lock may lapse up to a second
  before ``ttl``. Keep the work well inside ``ttl``, or ``extend`` the lease.
* The lock lives on one memcached server. If that server is restarted or
  evicts the key, the lock is gone. In a cluster, a lock taken on a stand-in
  server while its home server is away is not seen once that server returns
  (see ``cache/memcached/cluster.py``). Use it to avoid duplicate work, not to guard money.
* A value at the lock's key that is not a holder we wrote (parsed strictly) is
  held by ``(unreadable)``: never taken over, until memcached expires it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

from tenacity import (
    RetryCallState,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from ..cache.cas import MISSING, Contended, Outcome, changing, on
from ..cache.client import CLIENT_ERRORS, ClientSource, CommandClient, key_digest
from ..cache.retrying import elapsed, memcache_retrying
from ..core import parse
from ..core.effects import Steps, drive, retrying
from ..core.validation import MAX_MEMCACHED_TTL, check_memcached_ttl, check_seconds
from ..errors import CacheUnavailable, ShardedCounterError
from ..settings import Settings

log = logging.getLogger("sharded_counter")

_FORMAT = "lk1"
_TOMBSTONE = f"{_FORMAT} released".encode()
_TOMBSTONE_TTL = 60  # just so released locks do not sit in memory forever
MAX_TTL = MAX_MEMCACHED_TTL  # memcached reads a longer relative expiry as a timestamp
#: Who holds a lock whose value is not a holder we wrote.
UNREADABLE = "(unreadable)"
# A holder's value: the format, a token, two times and a host, pid and thread name.
_MAX_HOLDER_BYTES = 4096
_FIRST_WAIT, _MAX_WAIT = 0.005, 0.25
# Lost races on the lock's key before a take or a release gives up: a lock changes
# hands rarely, so a few are plenty.
_ATTEMPTS = 8
_JITTERED = wait_random_exponential(multiplier=_FIRST_WAIT, max=_MAX_WAIT)
# memcache failing: the blocking client's errors, or the asyncio shell's CacheUnavailable.
_UNAVAILABLE: tuple[type[BaseException], ...] = (*CLIENT_ERRORS, CacheUnavailable)


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock, as it was written when it was taken (or last extended)."""

    owner: str  # "host pid N thread-name"
    acquired_at: float
    expires_at: float  # at the latest; memcached may drop it up to a second sooner

    def ttl(self, now: float | None = None) -> float:
        """Seconds until the lock lapses at the latest (0 when it has)."""
        return max(0.0, self.expires_at - (time.time() if now is None else now))


class Locked(ShardedCounterError):
    """The lock is held by someone else: at once with ``nowait``, or still after
    waiting ``timeout`` seconds.

    Nothing was taken. ``holder`` is who held it at the last look; ``waited`` is
    how long this caller waited (None with ``nowait``).
    """

    def __init__(self, name: str, holder: Holder | None, waited: float | None = None) -> None:
        who = f"{holder.owner} for up to {holder.ttl():.1f} s more" if holder else "someone"
        waiting = f" after waiting {waited:.2f} s" if waited is not None else ""
        super().__init__(f"lock {name!r} is held by {who}{waiting}")
        self.name = name
        self.holder = holder
        self.waited = waited


class LeaseRules:
    """One attempt to hold a named lock, as steps (core/effects.py): taking it, extending
    it, giving it back. ``Lease`` carries them out in this thread and
    ``sharded_counter.aio.AsyncLease`` in an event loop, on the same key."""

    def __init__(
        self,
        name: str,
        *,
        ttl: int,
        nowait: bool,
        timeout: float | None,
        key_prefix: str,
    ) -> None:
        self.name = name
        self.ttl = _check_ttl(ttl)
        self.nowait = nowait
        self.timeout = float(self.ttl) if timeout is None else _check_timeout(timeout)
        self.token = secrets.token_hex(16)
        self.expires_at: float | None = None  # set while held
        self._key = lock_key(key_prefix, name)

    def __repr__(self) -> str:
        state = "held" if self.expires_at is not None else "not held"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    def _acquiring(self) -> Steps[None]:
        """Take the lock, waiting with backoff unless ``nowait``; raise ``Locked`` if it
        stays held, ``CacheUnavailable`` if memcache cannot be asked."""

        def refuse(state: RetryCallState) -> None:
            holder = state.outcome.result() if state.outcome is not None else None
            raise Locked(self.name, holder, None if self.nowait else elapsed(state))

        waiting = memcache_retrying(
            f"lock {self.name!r} is held",
            stop=stop_after_attempt(1) if self.nowait else stop_after_delay(self.timeout),
            retry=retry_if_result(lambda holder: holder is not None),
            wait=self._backoff,
            give_up=refuse,
        )
        yield from retrying(waiting, self._try_take)

    def _backoff(self, state: RetryCallState) -> float:
        # Exponential backoff with jitter, so waiters do not all retry in step; never
        # past the timeout, so the last look comes as it runs out.
        pause = _JITTERED(state)
        return max(0.0, min(pause, self.timeout - elapsed(state)))

    def _try_take(self) -> Steps[Holder | None]:
        """Take the lock if it is free (missing, or a tombstone); otherwise return who
        holds it. Tries ``add`` first: a lock is mostly free when it is taken."""
        taken_at = 0.0

        def take(raw: bytes | None) -> Outcome[Holder | None]:
            nonlocal taken_at
            if raw is not None and raw != _TOMBSTONE:
                return _decode(raw) or Holder(UNREADABLE, 0.0, 0.0), None
            taken_at = time.time()
            return None, _encode(self.token, taken_at, taken_at + self.ttl, _owner())

        try:
            holder: Holder | None = yield from changing(
                self._key, take, expire=self.ttl, attempts=_ATTEMPTS, first=MISSING
            )
        except Contended:
            return Holder("(changing hands)", time.time(), time.time())
        except _UNAVAILABLE as exc:
            raise CacheUnavailable(f"cannot take lock {self.name!r}: {exc}") from exc
        if holder is None:
            self.expires_at = taken_at + self.ttl
        return holder

    def _extending(self, ttl: int | None) -> Steps[bool]:
        ttl = self.ttl if ttl is None else _check_ttl(ttl)
        now = time.time()
        owner = _owner()
        replaced = yield from self._replace_if_ours(
            lambda: _encode(self.token, now, now + ttl, owner), ttl
        )
        if replaced:
            self.expires_at = now + ttl
        return replaced

    def _releasing(self) -> Steps[bool]:
        if self.expires_at is None:
            return False
        self.expires_at = None
        try:
            released = yield from self._replace_if_ours(lambda: _TOMBSTONE, _TOMBSTONE_TTL)
        except CacheUnavailable as exc:
            log.warning("lock %r not released (%s); it lapses within its TTL", self.name, exc)
            return False
        if not released:
            log.warning(
                "lock %r had lapsed before it was released; its work may have overlapped "
                "another holder's (give it a longer ttl, or extend it)",
                self.name,
            )
        return released

    def _replace_if_ours(self, value: Callable[[], bytes], expire: int) -> Steps[bool]:
        def replace(raw: bytes | None) -> Outcome[bool]:
            if _token(raw) != self.token:
                return False, None  # lapsed, released, or someone else's now
            return True, value()

        try:
            replaced: bool = yield from changing(
                self._key, replace, expire=expire, attempts=_ATTEMPTS
            )
        except Contended:
            return False  # it kept changing: not ours to count on
        except _UNAVAILABLE as exc:
            raise CacheUnavailable(f"lock {self.name!r}: {exc}") from exc
        return replaced


class Lease(LeaseRules):
    """One attempt to hold a named lock: a context manager, or ``acquire()``/``release()``."""

    def __init__(
        self, name: str, *, ttl: int, nowait: bool, timeout: float | None, client: ClientSource
    ) -> None:
        super().__init__(
            name, ttl=ttl, nowait=nowait, timeout=timeout, key_prefix=client.key_prefix
        )
        self._client = client

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> Lease:
        """Take the lock, waiting with backoff unless ``nowait``; raise ``Locked`` if it stays held.

        Raises ``CacheUnavailable`` if memcache cannot be asked.
        """
        drive(self._acquiring(), on(self._client()))
        return self

    def extend(self, ttl: int | None = None) -> bool:
        """Push the expiry to ``ttl`` (default: the lease's) seconds from now, if still ours."""
        return drive(self._extending(ttl), on(self._client()))

    def release(self) -> bool:
        """Give the lock back if it is still ours. Never raises: a lock left behind lapses."""
        if self.expires_at is None:
            return False
        return drive(self._releasing(), on(self._client()))


def lock(
    name: str,
    ttl: int = 10,
    nowait: bool = True,
    timeout: float | None = None,
    *,
    memcache_client: CommandClient | None = None,
    memcached_hosts: str | list[str] | tuple[str, ...] | None = None,
    cache_url: str | None = None,
    key_prefix: str | None = None,
) -> Lease:
    """A lease on the lock ``name``: use it as ``with lock('crazy', ttl=10): ...``.

    ``ttl`` (whole seconds) bounds how long the lock outlives a holder that dies.
    With ``nowait`` (the default) a held lock raises ``Locked`` at once;
    otherwise it waits with exponential backoff for up to ``timeout`` seconds
    (default: ``ttl``, by which time a dead holder's lock has lapsed), then
    raises ``Locked``. Without ``memcache_client`` the servers come from the
    settings (``cache_url`` or ``memcached_hosts`` here, else
    ``SHARDED_COUNTER_CACHE_URL``, ``MEMCACHED_HOSTS`` or the config).
    """
    if not isinstance(name, str):
        raise TypeError(f"a lock name is a str, not {type(name).__name__}")
    source = _source(memcache_client, memcached_hosts, cache_url, key_prefix)
    return Lease(name, ttl=ttl, nowait=nowait, timeout=timeout, client=source)


def who_holds(
    name: str,
    *,
    memcache_client: CommandClient | None = None,
    memcached_hosts: str | list[str] | tuple[str, ...] | None = None,
    cache_url: str | None = None,
    key_prefix: str | None = None,
) -> Holder | None:
    """Who holds lock ``name`` now, or None when it is free. Raises ``CacheUnavailable``."""
    source = _source(memcache_client, memcached_hosts, cache_url, key_prefix)
    return _holder_at(source, lock_key(source.key_prefix, name), name)


def who_holds_internal(
    purpose: str,
    *parts: str,
    memcache_client: CommandClient | None = None,
    settings: Settings | None = None,
) -> Holder | None:
    """``who_holds`` for a lock of the library's own (``internal_lock``), in the cache
    ``settings`` name (the caller's whole cache choice; default: the process's)."""
    source = ClientSource(memcache_client, settings=settings, what="lock")
    key = internal_lock_key(source.key_prefix, purpose, *parts)
    return _holder_at(source, key, ":".join((purpose, *parts)))


def _source(
    memcache_client: CommandClient | None,
    memcached_hosts: str | list[str] | tuple[str, ...] | None,
    cache_url: str | None,
    key_prefix: str | None,
) -> ClientSource:
    """Where a lock's calls get their client (the caller's, or this process's own)."""
    return ClientSource(
        memcache_client,
        memcached_hosts=memcached_hosts,
        cache_url=cache_url,
        key_prefix=key_prefix,
        what="lock",
    )


def _holder_at(source: ClientSource, key: str, name: str) -> Holder | None:
    try:
        raw = source().get(key)
    except CLIENT_ERRORS as exc:
        raise CacheUnavailable(f"lock {name!r}: {exc}") from exc
    return _decode(raw)


def lock_key(prefix: str, name: str) -> str:
    return f"{prefix}:lock:{key_digest(name)}"


def internal_lock_key(prefix: str, purpose: str, *parts: str) -> str:
    """The key of an ``internal_lock``: ``purpose`` and ``parts`` hashed as separate
    parts, which no ``lock(name)`` key can equal."""
    return f"{prefix}:lock:{key_digest(purpose, *parts)}"


def internal_lock(
    purpose: str,
    *parts: str,
    ttl: int,
    memcache_client: CommandClient | None = None,
    settings: Settings | None = None,
) -> Lease:
    """A lock of the library's own (a SharedBuffer flusher's, per counter), taken at once
    or ``Locked``. Its key hashes ``purpose`` and ``parts`` as separate parts, where a
    ``lock(name)`` key hashes the one name: ``key_digest`` length-prefixes each part,
    so no user's lock name can give the same key. It lives in the cache ``settings``
    name, which a caller passes whole: the lock must be in the same cache as what it
    guards, with the same timeouts."""
    source = ClientSource(memcache_client, settings=settings, what="lock")
    lease = Lease(":".join((purpose, *parts)), ttl=ttl, nowait=True, timeout=None, client=source)
    lease._key = internal_lock_key(source.key_prefix, purpose, *parts)
    return lease


def _owner() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} {threading.current_thread().name}"


def _encode(token: str, acquired_at: float, expires_at: float, owner: str) -> bytes:
    # Floored to the millisecond, not rounded: the time it was taken is never in
    # the future, and the expiry is never later than the real one.
    acquired, expires = math.floor(acquired_at * 1000), math.floor(expires_at * 1000)
    return f"{_FORMAT} {token} {acquired / 1000:.3f} {expires / 1000:.3f} {owner}".encode()


def _token(raw: bytes | None) -> str | None:
    """The token of the holder written in ``raw``; None for a free or unreadable lock."""
    if not raw or raw == _TOMBSTONE:
        return None
    try:
        return _parse(raw)[0]
    except parse.Garbled:
        return None


def _decode(raw: bytes | None) -> Holder | None:
    """The holder written in ``raw``; None for a free lock (missing or a tombstone).

    Anything else that is not a holder we wrote is held by ``(unreadable)``: never
    taken over, it stays held until memcached expires it (docs/security.md)."""
    if not raw or raw == _TOMBSTONE:
        return None
    try:
        return _parse(raw)[1]
    except parse.Garbled:
        return Holder(UNREADABLE, 0.0, 0.0)


def _parse(raw: bytes) -> tuple[str, Holder]:
    """``lk1 <token> <acquired> <expires> <owner>``, strictly; raises ``parse.Garbled``."""
    if len(raw) > _MAX_HOLDER_BYTES:
        raise parse.Garbled(f"{len(raw)} bytes: longer than any holder we write")
    try:
        fields = bytes(raw).decode("utf-8").split(" ", 4)
    except UnicodeDecodeError as exc:
        raise parse.Garbled("not UTF-8") from exc
    if len(fields) != 5 or fields[0] != _FORMAT:
        raise parse.Garbled("not a lock holder")
    _, token, acquired, expires, owner = fields
    holder = Holder(owner, parse.deadline(acquired), parse.deadline(expires))
    return parse.token(token), holder


def _check_ttl(ttl: int) -> int:
    return check_memcached_ttl(ttl, "ttl")  # whole seconds: memcached's expiry


def _check_timeout(timeout: float) -> float:
    # Up to the longest ttl: the default timeout is the ttl.
    return check_seconds(timeout, "timeout", zero_ok=True, maximum=MAX_TTL)

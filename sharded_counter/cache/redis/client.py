"""pymemcache's calls, with memcached's meaning, on one Redis or Valkey server, from threads.

What each call sends and how its answer reads is ``commands.py``'s; this module
only sends them (``RedisCalls``, which a cluster's client shares). Thread-safe: each
call borrows a connection from redis-py's blocking pool (at most ``max_pool_size``,
waiting up to ``timeout`` for one), and redis-py's pool makes new connections in a
forked child. Needs redis-py 5.3 or later (``get_connection()`` without a command name).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from ...errors import CacheUnavailable
from . import commands
from .commands import CacheNotReached, Call, NoScript


class RedisCalls:
    """pymemcache's calls, with memcached's meaning, made of ``commands.Call``s.

    A subclass says only how a call reaches a server (``_send``): ``RedisClient``
    over one connection pool, ``cluster.RedisClusterClient`` to the node that holds
    the key. Every call is sent once: none is resent after a timeout or a lost
    connection, since a write resent may apply twice.
    """

    # -- reads ----------------------------------------------------------------------------

    def get(self, key: str | bytes, default: Any = None) -> Any:
        found = self.get_many([key])
        return found.get(key, default)

    def get_many(self, keys: Iterable[str | bytes]) -> dict[Any, bytes]:
        return {key: data for key, (data, _) in self.gets_many(keys).items()}

    def gets(
        self, key: str | bytes, default: Any = None, cas_default: Any = None
    ) -> tuple[Any, Any]:
        found = self.gets_many([key])
        return found.get(key, (default, cas_default))

    def gets_many(self, keys: Iterable[str | bytes]) -> dict[Any, tuple[bytes, bytes]]:
        _, call = commands.gets_many(keys)
        return {} if call is None else self._perform(call)

    # -- writes ---------------------------------------------------------------------------

    def add(
        self, key: str | bytes, value: Any, expire: int = 0, noreply: bool | None = None
    ) -> bool:
        return self._perform(commands.add(key, value, expire, noreply))  # type: ignore[no-any-return]

    def cas(
        self,
        key: str | bytes,
        value: Any,
        cas: Any,
        expire: int = 0,
        noreply: bool | None = False,
    ) -> bool | None:
        return self._perform(commands.cas(key, value, cas, expire, noreply))  # type: ignore[no-any-return]

    def append(
        self, key: str | bytes, value: Any, expire: int = 0, noreply: bool | None = None
    ) -> bool:
        """Add ``value`` after the key's data; False when the key is missing. ``expire``
        is ignored, as memcached ignores it: the key keeps its own."""
        return self._perform(commands.append(key, value, expire, noreply))  # type: ignore[no-any-return]

    def incr(self, key: str | bytes, value: int, noreply: bool | None = False) -> int | None:
        return self._perform(commands.delta("incr", key, value, noreply))  # type: ignore[no-any-return]

    def decr(self, key: str | bytes, value: int, noreply: bool | None = False) -> int | None:
        return self._perform(commands.delta("decr", key, value, noreply))  # type: ignore[no-any-return]

    def delete(self, key: str | bytes, noreply: bool | None = None) -> bool:
        return self._perform(commands.delete(key, noreply))  # type: ignore[no-any-return]

    # -- talking to the server ------------------------------------------------------------

    def _perform(self, call: Call) -> Any:
        """Send ``call`` and read its answer. A script goes by its SHA1, and whole when
        the server lacks it (after a restart or ``SCRIPT FLUSH``)."""
        if call.script is None:
            return call.read(self._send(call, call.command))
        try:
            reply = self._send(call, call.evalsha())
        except NoScript:
            reply = self._send(call, call.eval())
        return call.read(reply)

    def _send(self, call: Call, command: tuple[Any, ...]) -> Any:
        """Send ``command`` and return Redis's answer; failures as ``commands.failure``
        gives them, ``CacheNotReached`` when it was never sent."""
        raise NotImplementedError


class RedisClient(RedisCalls):
    """pymemcache's calls, with memcached's meaning, on one Redis or Valkey server."""

    def __init__(
        self,
        host: str,
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        connect_timeout: float = 0.5,
        timeout: float = 0.5,
        max_pool_size: int = 64,
    ) -> None:
        connection_class: type[redis.Connection] = redis.SSLConnection if tls else redis.Connection
        # A TLS connection checks the server's certificate and name: against ca_file
        # when given, else the system's CAs.
        tls_options = {"ssl_ca_certs": ca_file} if tls and ca_file else {}
        self.address = (host, port)
        self._pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
            connection_class=connection_class,
            max_connections=max_pool_size,
            timeout=timeout,  # how long a call waits for a free connection
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            # A call is sent once: resending a write that timed out could apply it twice.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            **tls_options,
        )

    def __repr__(self) -> str:
        host, port = self.address
        return f"RedisClient({host!r}, {port})"

    def close(self) -> None:
        """Close every pooled connection; the next call opens a new one."""
        self._pool.disconnect()

    def _send(self, call: Call, command: tuple[Any, ...]) -> Any:
        try:
            connection = self._pool.get_connection()  # type: ignore[no-untyped-call]
        except RedisError as exc:
            raise CacheNotReached(f"redis {call.name}: {exc}", maybe_applied=False) from exc
        try:
            return exchange(connection, call, command)
        finally:
            self._pool.release(connection)  # type: ignore[no-untyped-call]


def exchange(
    connection: Any,  # a redis.Connection (untyped)
    call: Call,
    command: tuple[Any, ...],
    *,
    answers: tuple[type[BaseException], ...] = (),
) -> Any:
    """Send ``command`` on ``connection`` and return Redis's answer; failures as
    ``commands.failure`` gives them. An error of ``answers`` (a cluster's redirects)
    is raised as it is: an answer, after which the connection is fine."""
    try:
        connection.send_command(*command)
        return connection.read_response()
    except answers:
        raise
    except BaseException as exc:
        ours = commands.failure(exc, call)
        if ours is None or isinstance(ours, CacheUnavailable):
            # Its answer may still come (a timeout), or an interrupt mid-read left an
            # answer unread: never let the next call read it as its own. redis-py's
            # checkout drops a connection with data waiting, not one whose answer
            # is still on its way.
            connection.disconnect()
        if ours is None:
            raise
        raise ours from exc

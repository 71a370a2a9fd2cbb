"""A Redis (or Valkey) client that behaves as pymemcache does against memcached.

The first step towards Redis and Valkey as the cache (docs/cache-backends.md): the
cache tier, the stash, leases and the patterns run unchanged on it, because it
answers the calls they make of pymemcache (``MemcacheClient`` and ``CommandClient``
in ``client.py``, and ``append``) with memcached's meaning:

- **cas tokens.** Each key holds one string, ``b"<cas unique>:<data>"``. Every write
  takes its cas unique from one counter that only grows (``INCR`` of
  ``CAS_UNIQUES_KEY``, as memcached keeps one for the whole server), so a token is
  never seen twice, even after the key is deleted and made again. When the counter
  itself is gone (a flush, a restart, an eviction) it starts again from the server's
  clock in microseconds, so tokens keep growing where memcached's start again at 1.
  ``gets`` hands a token out as pymemcache does (ASCII digits, as ``bytes``); ``cas``
  stores only while it is current: True, False when another write came first, None
  when the key is gone.
- **Atomic writes.** ``add``, ``cas``, ``append``, ``incr`` and ``decr`` are Lua
  scripts: each reads, decides and writes in one step on the server.
- **Counters.** ``incr`` and ``decr`` read the data as an unsigned 64-bit decimal,
  as memcached does: a missing key gives None and is never created; ``incr`` wraps
  at 2**64, ``decr`` stops at 0; data that is no such number is refused
  (``CacheCommandError``, a pymemcache ``MemcacheClientError``, as memcached's
  ``CLIENT_ERROR`` is). The arithmetic is on decimal strings, since Lua's numbers
  are doubles. A result shorter than the data it replaces is space-padded to its
  length (``b"9 "`` after ``decr`` of ``b"10"``), as memcached writes it in place.
- **Expiry** as memcached reads ``exptime``: 0 never, up to 30 days a number of
  seconds, above that a unix time, negative (or a time already past) expired at
  once. ``append``, ``incr`` and ``decr`` keep a key's expiry. Redis counts in
  milliseconds, so a key lives its full ttl (memcached's one-second clock may end it
  up to a second early).
- **Keys and input** are checked as pymemcache checks them, before anything is
  sent: ASCII, 1 to 250 bytes, no whitespace or NUL (``InvalidCacheInput``, which
  is a ``ValueError`` and pymemcache's ``MemcacheIllegalInputError``).
- **noreply** is accepted and gives what pymemcache gives (True; None for
  ``incr``/``decr``), but the call still waits for Redis's answer, so it costs a
  round trip and a failure still raises.

Failures are exceptions the callers already handle: a ``CacheUnavailable`` that is
also the ``OSError`` pymemcache's socket errors are (``client.CLIENT_ERRORS``).
``CacheNotReached`` (a ``ConnectionRefusedError``: ``guarded.py`` reads it as never
sent) when no connection could be had, so the call was never sent;
``CacheTimedOut`` (a ``TimeoutError``) and ``CacheConnectionLost`` (a
``ConnectionError``) after it was sent, with ``maybe_applied`` true for a write.
Nothing is retried: a write that timed out may have landed.

Thread-safe: each call borrows a connection from redis-py's blocking pool (at most
``max_pool_size``, waiting up to ``timeout`` for one), and redis-py's pool makes new
connections in a forked child. Needs Redis 6.2 or later, or Valkey (``SET ...
EXAT`` and ``KEEPTTL``), and redis-py 5.3 or later (``get_connection()`` without a
command name).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import redis
from pymemcache.exceptions import MemcacheClientError, MemcacheIllegalInputError
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..errors import CacheUnavailable, ShardedCounterError

#: The key of the counter every write takes its cas unique from. It holds a space,
#: which no key a caller passes can (see ``check_key``), so it never meets one.
CAS_UNIQUES_KEY = "sharded_counter cas-uniques"

#: memcached's longest key, in bytes.
MAX_KEY_BYTES = 250

#: ``exptime`` above this many seconds (30 days) is a unix time, as memcached reads it.
RELATIVE_EXPIRY_LIMIT = 30 * 24 * 3600

_UINT64_LIMIT = 2**64  # incr/decr deltas and cas tokens are unsigned 64-bit


class CacheCommandError(ShardedCounterError, MemcacheClientError):  # type: ignore[misc]
    """The server refused a call, as memcached answers ``CLIENT_ERROR``: ``incr`` or
    ``decr`` of data that is no unsigned 64-bit number, a delta or cas token out of
    range, a key that holds something this client did not write. Nothing was changed.
    Also a pymemcache ``MemcacheClientError``, as code written for pymemcache expects.
    """


class InvalidCacheInput(CacheCommandError, MemcacheIllegalInputError, ValueError):  # type: ignore[misc]
    """A key, value or number that memcached would not take (pymemcache refuses it
    before sending, with its ``MemcacheIllegalInputError``): nothing was sent."""


class CacheNotReached(CacheUnavailable, ConnectionRefusedError):
    """No connection to the server could be had (refused, unreachable, connect or
    AUTH timed out, or the pool stayed full): the call was never sent."""


class CacheConnectionLost(CacheUnavailable, ConnectionError):
    """The connection failed after the call was sent: a write may have been applied
    (``maybe_applied``)."""


class CacheTimedOut(CacheUnavailable, TimeoutError):
    """No answer within the timeout after the call was sent: a write may have been
    applied (``maybe_applied``)."""


# -- the scripts --------------------------------------------------------------------------

# Shared by every script: KEYS[1] is the key, KEYS[2] the cas uniques' counter.
_COMMON = r"""
local key, uniques = KEYS[1], KEYS[2]

-- The data with a cas unique new for this write in front: "<unique>:<data>".
-- A counter that is missing (a new server, a flush, a restart without persistence,
-- an eviction) starts again from the clock in microseconds, above any unique handed
-- out before unless writes outran a million a second. INCR's integer arrives as a
-- Lua double: exact up to 2^53, which the clock reaches in the year 2255.
local function stamped(data)
  local unique = redis.call('INCR', uniques)
  if unique == 1 then
    local now = redis.call('TIME')
    unique = tonumber(now[1]) * 1000000 + tonumber(now[2])
    redis.call('SET', uniques, string.format('%.0f', unique))
  end
  return string.format('%.0f', unique) .. ':' .. data
end

-- The data and its cas unique, or nil when the key is missing.
local function read()
  local blob = redis.call('GET', key)
  if not blob then return nil end
  local colon = string.find(blob, ':', 1, true)
  if not colon then
    error({err = 'CLIENT_ERROR the key holds a value this client did not write'})
  end
  return string.sub(blob, colon + 1), string.sub(blob, 1, colon - 1)
end

-- Store data with memcached's exptime: 0 never expires, up to 30 days is seconds
-- from now, above that a unix time; negative, or a time already past, expires it
-- at once (the write succeeds and the key is gone).
local function store(data, exptime)
  exptime = tonumber(exptime)
  local blob = stamped(data)
  if exptime == 0 then
    redis.call('SET', key, blob)
  elseif exptime > 2592000 then
    if exptime <= tonumber(redis.call('TIME')[1]) then
      redis.call('DEL', key)
    else
      redis.call('SET', key, blob, 'EXAT', exptime)
    end
  elseif exptime > 0 then
    redis.call('SET', key, blob, 'EX', exptime)
  else
    redis.call('DEL', key)
  end
end

-- Change the data, keeping the key's expiry (append, incr and decr do).
local function rewrite(data)
  redis.call('SET', key, stamped(data), 'KEEPTTL')
end
"""

# ARGV: data, exptime. 1 stored, 0 the key exists.
_ADD = (
    _COMMON
    + r"""
if redis.call('EXISTS', key) == 1 then return 0 end
store(ARGV[1], ARGV[2])
return 1
"""
)

# ARGV: data, cas token (digits, no leading zeros), exptime.
# 1 stored, 0 another write came first, -1 the key is missing.
_CAS = (
    _COMMON
    + r"""
local _, unique = read()
if not unique then return -1 end
if unique ~= ARGV[2] then return 0 end
store(ARGV[1], ARGV[3])
return 1
"""
)

# ARGV: data. 1 appended, 0 the key is missing.
_APPEND = (
    _COMMON
    + r"""
local data = read()
if not data then return 0 end
rewrite(data .. ARGV[1])
return 1
"""
)

# ARGV: delta (decimal digits, below 2^64), 'incr' or 'decr'.
# The new value as decimal digits, or nil when the key is missing.
_DELTA = (
    _COMMON
    + r"""
local TWO_TO_64 = '18446744073709551616'

local function trimmed(digits)
  digits = string.gsub(digits, '^0+', '')
  if digits == '' then return '0' end
  return digits
end

local function below(a, b)  -- a < b, both trimmed decimal strings
  if #a ~= #b then return #a < #b end
  return a < b
end

local function plus(a, b)
  local out, carry, i, j = {}, 0, #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local d = carry
    if i > 0 then d = d + string.byte(a, i) - 48 end
    if j > 0 then d = d + string.byte(b, j) - 48 end
    table.insert(out, 1, d % 10)
    carry = (d >= 10) and 1 or 0
    i, j = i - 1, j - 1
  end
  return trimmed(table.concat(out))
end

local function minus(a, b)  -- a - b, for a >= b
  local out, borrow, i, j = {}, 0, #a, #b
  while i > 0 do
    local d = string.byte(a, i) - 48 - borrow
    if j > 0 then d = d - (string.byte(b, j) - 48) end
    if d < 0 then d, borrow = d + 10, 1 else borrow = 0 end
    table.insert(out, 1, d)
    i, j = i - 1, j - 1
  end
  return trimmed(table.concat(out))
end

-- memcached reads the data with strtoull: leading whitespace, a sign, digits, then
-- the end, whitespace or a NUL. Out of the unsigned 64-bit range is no number; a
-- '-' negates modulo 2^64, and memcached takes the result only below 2^63.
local TWO_TO_63 = '9223372036854775808'
local function number(data)
  local sign, digits, rest = string.match(data, '^%s*([+-]?)(%d+)(.*)$')
  if not digits or (rest ~= '' and not string.find(rest, '^[%s%z]')) then return nil end
  digits = trimmed(digits)
  if not below(digits, TWO_TO_64) then return nil end
  if sign == '-' and digits ~= '0' then
    digits = minus(TWO_TO_64, digits)
    if not below(digits, TWO_TO_63) then return nil end
  end
  return digits
end

local data = read()
if not data then return false end
local value = number(data)
if not value then
  return redis.error_reply('CLIENT_ERROR cannot increment or decrement non-numeric value')
end
if ARGV[2] == 'incr' then
  value = plus(value, ARGV[1])
  if not below(value, TWO_TO_64) then value = minus(value, TWO_TO_64) end
elseif below(value, ARGV[1]) then
  value = '0'
else
  value = minus(value, ARGV[1])
end
-- Written over the old data when it fits, space-padded to its length, as memcached
-- writes it in place; the answer is the number alone.
local stored = value
if #value < #data then stored = value .. string.rep(' ', #data - #value) end
rewrite(stored)
return value
"""
)


class _Script:
    """A Lua script, run by its SHA1 and sent whole only when the server lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


_SCRIPTS = {
    name: _Script(source)
    for name, source in (("add", _ADD), ("cas", _CAS), ("append", _APPEND), ("delta", _DELTA))
}


# -- input checks, as pymemcache makes them -----------------------------------------------


def check_key(key: str | bytes) -> bytes:
    """``key`` as bytes, if memcached would take it: ASCII, 1 to 250 bytes, no
    whitespace or NUL. Else ``InvalidCacheInput``."""
    if isinstance(key, str):
        try:
            raw = key.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidCacheInput(f"Non-ASCII key: {key!r}") from None
    elif isinstance(key, bytes):
        raw = key
    else:
        raise InvalidCacheInput(f"a key must be str or bytes, not {type(key).__name__}")
    if not raw:
        raise InvalidCacheInput("a key must not be empty")
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidCacheInput(f"Key is too long: {raw!r}")
    if len(raw.split()) != 1 or raw.split()[0] != raw:
        raise InvalidCacheInput(f"Key contains whitespace: {raw!r}")
    if b"\x00" in raw:
        raise InvalidCacheInput(f"Key contains null: {raw!r}")
    return raw


def _data(value: Any) -> bytes:
    """The bytes stored for ``value``: bytes as they are, anything else as its ``str``
    (pymemcache without a serializer does the same)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode()


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidCacheInput(f"{what} must be an int, not {value!r}")
    return value


def _token(cas: Any) -> bytes:
    """A cas token as ``gets`` gives them (digits), from an int, str or bytes."""
    if isinstance(cas, int) and not isinstance(cas, bool):
        cas = str(cas)
    if isinstance(cas, str):
        cas = cas.encode("ascii", "replace")
    if not isinstance(cas, bytes) or not cas.isdigit():
        raise InvalidCacheInput(f"Non-digit cas argument {cas!r}")
    if int(cas) >= _UINT64_LIMIT:
        raise CacheCommandError(f"cas token {cas!r} is out of the unsigned 64-bit range")
    return str(int(cas)).encode()


def _split(blob: bytes, key: Any) -> tuple[bytes, bytes]:
    """``(data, cas unique)`` of a stored string."""
    unique, colon, data = blob.partition(b":")
    if not colon or not unique.isdigit():
        raise CacheCommandError(f"key {key!r} holds a value this client did not write")
    return data, unique


# -- the client ---------------------------------------------------------------------------


class RedisClient:
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
        connect_timeout: float = 0.5,
        timeout: float = 0.5,
        max_pool_size: int = 64,
    ) -> None:
        connection_class: type[redis.Connection] = redis.SSLConnection if tls else redis.Connection
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
        )

    def __repr__(self) -> str:
        host, port = self.address
        return f"RedisClient({host!r}, {port})"

    def close(self) -> None:
        """Close every pooled connection; the next call opens a new one."""
        self._pool.disconnect()

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
        wanted = list(keys)
        if not wanted:
            return {}
        raw_keys = [check_key(k) for k in wanted]
        blobs = self._call(False, "MGET", *raw_keys)
        return {
            key: _split(blob, key)
            for key, blob in zip(wanted, blobs, strict=True)
            if blob is not None
        }

    # -- writes ---------------------------------------------------------------------------

    def add(
        self, key: str | bytes, value: Any, expire: int = 0, noreply: bool | None = None
    ) -> bool:
        stored = self._script("add", key, _data(value), _integer(expire, "expire"))
        return True if noreply else stored == 1

    def cas(
        self,
        key: str | bytes,
        value: Any,
        cas: Any,
        expire: int = 0,
        noreply: bool | None = False,
    ) -> bool | None:
        token = _token(cas)
        stored = self._script("cas", key, _data(value), token, _integer(expire, "expire"))
        if noreply:
            return True
        return {1: True, 0: False}.get(stored)  # -1: the key is missing, None

    def append(
        self, key: str | bytes, value: Any, expire: int = 0, noreply: bool | None = None
    ) -> bool:
        """Add ``value`` after the key's data; False when the key is missing. ``expire``
        is ignored, as memcached ignores it: the key keeps its own."""
        _integer(expire, "expire")
        appended = self._script("append", key, _data(value))
        return True if noreply else appended == 1

    def incr(self, key: str | bytes, value: int, noreply: bool | None = False) -> int | None:
        return self._delta("incr", key, value, noreply)

    def decr(self, key: str | bytes, value: int, noreply: bool | None = False) -> int | None:
        return self._delta("decr", key, value, noreply)

    def delete(self, key: str | bytes, noreply: bool | None = None) -> bool:
        deleted = self._call(True, "DEL", check_key(key))
        return True if noreply else deleted == 1

    def _delta(self, verb: str, key: str | bytes, value: int, noreply: bool | None) -> int | None:
        delta = _integer(value, "value")
        if not 0 <= delta < _UINT64_LIMIT:
            raise CacheCommandError("invalid numeric delta argument")
        result = self._script("delta", key, str(delta).encode(), verb.encode())
        if noreply or result is None:
            return None
        return int(result)

    # -- talking to the server ------------------------------------------------------------

    def _script(self, name: str, key: str | bytes, *args: Any) -> Any:
        """Run script ``name`` on ``key``: by SHA1, and whole if the server lacks it
        (after a restart or ``SCRIPT FLUSH``; a NOSCRIPT answer ran nothing)."""
        script = _SCRIPTS[name]
        keys = (check_key(key), CAS_UNIQUES_KEY)
        try:
            return self._call(True, "EVALSHA", script.sha, len(keys), *keys, *args)
        except _NoScript:
            return self._call(True, "EVAL", script.source, len(keys), *keys, *args)

    def _call(self, write: bool, *command: Any) -> Any:
        """Send ``command`` and return Redis's answer; failures as this module's errors."""
        name = command[0]
        try:
            connection = self._pool.get_connection()  # type: ignore[no-untyped-call]
        except RedisError as exc:
            raise CacheNotReached(f"redis {name}: {exc}", maybe_applied=False) from exc
        try:
            connection.send_command(*command)
            return connection.read_response()
        except NoScriptError as exc:
            raise _NoScript(str(exc)) from exc
        except ResponseError as exc:
            raise CacheCommandError(f"redis {name}: {exc}") from exc
        except (RedisTimeoutError, TimeoutError) as exc:
            connection.disconnect()  # its answer may still come: never read it as another's
            raise CacheTimedOut(f"redis {name}: {exc}", maybe_applied=write) from exc
        except (RedisConnectionError, OSError) as exc:
            connection.disconnect()
            raise CacheConnectionLost(f"redis {name}: {exc}", maybe_applied=write) from exc
        except BaseException:
            # Anything else (an interrupt mid-read, say) may leave an answer unread on
            # the connection, which the next call would take for its own. redis-py's
            # checkout drops a connection with data waiting; not one whose answer is
            # still on its way.
            connection.disconnect()
            raise
        finally:
            self._pool.release(connection)  # type: ignore[no-untyped-call]


class _NoScript(Exception):
    """The server does not have a script yet: nothing ran."""

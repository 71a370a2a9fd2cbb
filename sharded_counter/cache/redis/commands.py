"""Redis and Valkey with memcached's meaning, as calls that do no I/O.

The cache tier, the stash, leases and the patterns were written against memcached
(pymemcache's calls). Each call here says what to send to Redis and how to read its
answer (a ``Call``); ``client.py`` sends them from threads, ``aio/redis.py`` from
asyncio, and cluster mode routes them, so all three mean the same:

- **cas tokens.** Each key holds one string, ``b"<cas unique>:<data>"``. A write's
  unique is the server's clock in microseconds, or one past the key's last when that
  is not below it, so a key's uniques only grow: a token read before a delete, a
  flush or an eviction never matches the key made again after it (memcached's uniques
  start again at 1 after a restart). ``gets`` hands a token out as pymemcache does
  (ASCII digits, as ``bytes``); ``cas`` stores only while it is current: True, False
  when another write came first, None when the key is gone. A string another client
  wrote (a plain ``SET``: no unique of ours in front) is all data, with token
  ``b"0"``, so garbage at a key is data as in memcached, and the next write of ours
  replaces it. A key of another type reads as missing (``MGET``'s answer) and every
  write to it is refused (``WRONGTYPE``).
- **One key per step.** ``add``, ``cas``, ``append``, ``incr`` and ``decr`` are Lua
  scripts that read, decide and write one key in one step on the server. No step
  touches two keys, so in cluster mode each runs on the node that holds its key and
  keys need no hash tags.
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

Failures (``failure``) are exceptions the callers already handle: a
``CacheUnavailable`` that is also the ``OSError`` pymemcache's socket errors are
(``client.CLIENT_ERRORS``). ``CacheNotReached`` (a ``ConnectionRefusedError``:
``guarded.py`` reads it as never sent) when no connection could be had;
``CacheTimedOut`` (a ``TimeoutError``) and ``CacheConnectionLost`` (a
``ConnectionError``) after the call was sent, with ``maybe_applied`` true for a
write. Nothing is retried: a write that timed out may have landed.

Needs Redis 6.2 or later, or Valkey (``SET ... EXAT`` and ``KEEPTTL``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable
from typing import Any

from pymemcache.exceptions import MemcacheClientError, MemcacheIllegalInputError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...errors import CacheUnavailable, ShardedCounterError

#: memcached's longest key, in bytes.
MAX_KEY_BYTES = 250

#: ``exptime`` above this many seconds (30 days) is a unix time, as memcached reads it.
RELATIVE_EXPIRY_LIMIT = 30 * 24 * 3600

_UINT64_LIMIT = 2**64  # incr/decr deltas and cas tokens are unsigned 64-bit


class CacheCommandError(ShardedCounterError, MemcacheClientError):  # type: ignore[misc]
    """The server refused a call, as memcached answers ``CLIENT_ERROR``: ``incr`` or
    ``decr`` of data that is no unsigned 64-bit number, a delta or cas token out of
    range, a key that holds another type than a string (``WRONGTYPE``). Nothing was
    changed.
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

# Shared by every script: KEYS[1] is the key, and the only key a script touches, so
# each runs on the one node that holds it in cluster mode.
_COMMON = r"""
local key = KEYS[1]
local previous = nil  -- the key's cas unique, once read() has read it

-- The data with a cas unique new for this write in front: "<unique>:<data>".
-- The unique is the server's clock in microseconds, or one past the key's last when
-- that is not below it (several writes in one microsecond, a clock set back). So a
-- key's uniques only grow, and a key made again after a delete, a flush or an
-- eviction starts above every unique it had before (one write takes longer than a
-- microsecond). A Lua double holds the clock exactly until the year 2255.
local function stamped(data)
  local now = redis.call('TIME')
  local unique = tonumber(now[1]) * 1000000 + tonumber(now[2])
  if previous and tonumber(previous) >= unique then unique = tonumber(previous) + 1 end
  return string.format('%.0f', unique) .. ':' .. data
end

-- The data and its cas unique, or nil when the key is missing. A string another
-- client wrote (no unique of ours in front: 1 to 19 digits, no leading zero, and a
-- colon) is all data, with cas unique 0: any value at a key is data, as in
-- memcached, and the next write replaces it.
local function read()
  local blob = redis.call('GET', key)
  if not blob then return nil end
  local unique, data = string.match(blob, '^([1-9]%d*):(.*)$')
  if not unique or #unique > 19 then return blob, '0' end
  previous = unique
  return data, unique
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
if redis.call('EXISTS', key) == 1 then
  redis.call('STRLEN', key)  -- a key of another type: refused (WRONGTYPE), as cas is
  return 0
end
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


class Script:
    """A Lua script, run by its SHA1 and sent whole only when the server lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


SCRIPTS = {
    name: Script(source)
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


#: A cas unique as the scripts write them: 1 to 19 digits, no leading zero.
_OUR_UNIQUE = re.compile(rb"[1-9][0-9]{0,18}")


def _split(blob: bytes) -> tuple[bytes, bytes]:
    """``(data, cas unique)`` of a stored string; one another client wrote (no unique
    of ours in front) is all data, with cas unique 0, as the scripts read it."""
    unique, colon, data = blob.partition(b":")
    if not colon or not _OUR_UNIQUE.fullmatch(unique):
        return blob, b"0"
    return data, unique


# -- the calls ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
    """One call, ready to send: Redis ``command`` (or ``script`` run on ``key`` with
    ``args``), whether it may change what the server holds, and how to read the answer.
    """

    name: str
    write: bool
    read: Callable[[Any], Any]
    command: tuple[Any, ...] = ()
    script: Script | None = None
    key: bytes = b""
    args: tuple[Any, ...] = ()

    def evalsha(self) -> tuple[Any, ...]:
        assert self.script is not None
        return ("EVALSHA", self.script.sha, 1, self.key, *self.args)

    def eval(self) -> tuple[Any, ...]:
        """The script sent whole: for a server that lacks it (a restart, ``SCRIPT
        FLUSH``, a node new to a cluster). A NOSCRIPT answer ran nothing."""
        assert self.script is not None
        return ("EVAL", self.script.source, 1, self.key, *self.args)


def _run(name: str, key: str | bytes, *args: Any, read: Callable[[Any], Any]) -> Call:
    return Call(name, True, read, script=SCRIPTS[name], key=check_key(key), args=args)


def gets_many(keys: Iterable[str | bytes]) -> tuple[list[Any], Call | None]:
    """``MGET`` of ``keys``; its answer read as ``{key: (data, cas unique)}`` of the
    keys found. ``(keys, None)`` when there are none: nothing to send."""
    wanted = list(keys)
    if not wanted:
        return wanted, None
    raw = [check_key(k) for k in wanted]

    def read(blobs: list[bytes | None]) -> dict[Any, tuple[bytes, bytes]]:
        return {
            key: _split(blob) for key, blob in zip(wanted, blobs, strict=True) if blob is not None
        }

    return wanted, Call("MGET", False, read, command=("MGET", *raw))


def add(key: str | bytes, value: Any, expire: int = 0, noreply: bool | None = None) -> Call:
    """1 stored, 0 the key exists."""
    return _run(
        "add",
        key,
        _data(value),
        _integer(expire, "expire"),
        read=lambda stored: True if noreply else stored == 1,
    )


def cas(
    key: str | bytes, value: Any, token: Any, expire: int = 0, noreply: bool | None = False
) -> Call:
    """True stored, False another write came first, None the key is missing."""
    digits = _token(token)
    return _run(
        "cas",
        key,
        _data(value),
        digits,
        _integer(expire, "expire"),
        read=lambda stored: True if noreply else {1: True, 0: False}.get(stored),
    )


def append(key: str | bytes, value: Any, expire: int = 0, noreply: bool | None = None) -> Call:
    """Add ``value`` after the key's data; False when the key is missing. ``expire``
    is ignored, as memcached ignores it: the key keeps its own."""
    _integer(expire, "expire")
    return _run(
        "append", key, _data(value), read=lambda appended: True if noreply else appended == 1
    )


def delta(verb: str, key: str | bytes, value: int, noreply: bool | None = False) -> Call:
    """``incr`` or ``decr``: the new value, None when the key is missing."""
    amount = _integer(value, "value")
    if not 0 <= amount < _UINT64_LIMIT:
        raise CacheCommandError("invalid numeric delta argument")

    def read(result: Any) -> int | None:
        return None if noreply or result is None else int(result)

    return _run("delta", key, str(amount).encode(), verb.encode(), read=read)


def delete(key: str | bytes, noreply: bool | None = None) -> Call:
    return Call(
        "DEL",
        True,
        lambda deleted: True if noreply else deleted == 1,
        command=("DEL", check_key(key)),
    )


# -- failures -----------------------------------------------------------------------------


class NoScript(Exception):
    """The server does not have a script yet: nothing ran. Send it whole."""


def failure(exc: BaseException, call: Call) -> BaseException | None:
    """What to raise in place of redis-py's ``exc``, met while ``call`` was under way
    (after it was sent), or None when it is no failure of the server's."""
    what = f"redis {call.name}: {exc}"
    if isinstance(exc, NoScriptError):
        return NoScript(str(exc))
    if isinstance(exc, ResponseError):
        return CacheCommandError(what)
    if isinstance(exc, (RedisTimeoutError, TimeoutError)):
        return CacheTimedOut(what, maybe_applied=call.write)
    if isinstance(exc, (RedisConnectionError, OSError)):
        return CacheConnectionLost(what, maybe_applied=call.write)
    return None

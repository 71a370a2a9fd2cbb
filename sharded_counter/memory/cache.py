"""memcached as a model in memory, with the calls the cache tier makes.

``MemcacheModel`` offers the methods of ``cache/guarded.py``'s ``GuardedClient``
that the protocol's steps name in their ``Memcache`` effects (``gets``, ``add``,
``cas``, ``append``, ``delete``, ``get_many``, ``gets_many``, ``call`` and
``send``), with memcached's meaning:

* ``cas`` stores only if nobody stored the key since the ``gets`` that handed
  out the token: True, else False (changed) or None (gone);
* ``add`` stores only a missing key; ``append`` only onto an existing one;
* ``incr`` and ``decr`` work on unsigned 64-bit decimal values: ``incr`` wraps
  past 2**64 - 1, ``decr`` stops at 0, and a value that is not decimal is a
  client error (``MemcacheClientError``: the guarded client's "never applied");
* an expiry up to 30 days is relative, past that a Unix time; 0 never expires;
* a value over 1 MB is refused (``MemcacheServerError``).

It keeps no time of its own: ``clock`` says what time it is. Faults are the
caller's to inject: ``evict``, ``flush_all`` and the calls' failures
(``tools/simulate``). It does not model memory limits (so no LRU eviction of
its own), slab classes, or ``noreply`` losing a reply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

_MAX_VALUE = 1024 * 1024
_RELATIVE_LIMIT = 60 * 60 * 24 * 30
_UINT64 = 2**64


class MemcacheModel:
    """One memcached server's items, in memory (see the module docstring)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._items: dict[str, tuple[bytes, int, float | None]] = {}  # value, cas, expires
        self._next_cas = 1

    # -- the items ---------------------------------------------------------------------------

    def _live(self, key: str) -> tuple[bytes, int, float | None] | None:
        item = self._items.get(key)
        if item is not None and item[2] is not None and item[2] <= self._clock():
            del self._items[key]
            return None
        return item

    def _store(self, key: str, value: bytes, expire: int) -> None:
        if not isinstance(value, bytes):
            value = str(value).encode()
        if len(value) > _MAX_VALUE:
            raise MemcacheServerError(b"object too large for cache")
        expires: float | None = None
        if expire:
            expires = float(expire) if expire > _RELATIVE_LIMIT else self._clock() + expire
        self._items[key] = (value, self._next_cas, expires)
        self._next_cas += 1

    @property
    def writes(self) -> int:
        """How many stores the model has made (a change shows as a new number)."""
        return self._next_cas

    def live_keys(self) -> list[str]:
        """Every live key (for the simulator's checks)."""
        return [k for k in list(self._items) if self._live(k) is not None]

    def peek(self, key: str) -> bytes | None:
        """The value at ``key``, without counting as a call (for the simulator's checks)."""
        item = self._live(key)
        return None if item is None else item[0]

    def evict(self, key: str) -> None:
        """Lose ``key``, as memcached does under memory pressure."""
        self._items.pop(key, None)

    def flush_all(self) -> None:
        """Lose everything, as ``flush_all`` or a restart does."""
        self._items.clear()

    # -- GuardedClient's calls ---------------------------------------------------------------

    def gets(self, key: str) -> tuple[bytes | None, Any]:
        item = self._live(key)
        return (None, None) if item is None else (item[0], item[1])

    def get(self, key: str) -> bytes | None:
        item = self._live(key)
        return None if item is None else item[0]

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        return {k: item[0] for k in keys if (item := self._live(k)) is not None}

    def gets_many(self, keys: Iterable[str]) -> dict[str, tuple[bytes, Any]]:
        return {k: (item[0], item[1]) for k in keys if (item := self._live(k)) is not None}

    def set(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool:
        self._store(key, value, expire)
        return True

    def add(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool:
        if self._live(key) is not None:
            return False
        self._store(key, value, expire)
        return True

    def cas(
        self, key: str, value: bytes, cas: Any, expire: int = 0, noreply: bool = False
    ) -> bool | None:
        item = self._live(key)
        if item is None:
            return None
        if item[1] != cas:
            return False
        self._store(key, value, expire)
        return True

    def append(self, key: str, value: bytes) -> bool:
        item = self._live(key)
        if item is None:
            return False
        if len(item[0]) + len(value) > _MAX_VALUE:
            raise MemcacheServerError(b"object too large for cache")
        self._items[key] = (item[0] + value, self._next_cas, item[2])
        self._next_cas += 1
        return True

    def delete(self, key: str, noreply: bool = False) -> bool:
        return self._live(key) is not None and self._items.pop(key, None) is not None

    def incr(self, key: str, value: int, noreply: bool = False) -> int | None:
        return self._add_to(key, _delta(value))

    def decr(self, key: str, value: int, noreply: bool = False) -> int | None:
        return self._add_to(key, -_delta(value))

    def _add_to(self, key: str, amount: int) -> int | None:
        item = self._live(key)
        if item is None:
            return None
        number = _as_number(item[0])
        if number is None:
            raise MemcacheClientError(b"cannot increment or decrement non-numeric value")
        new = number + amount
        new = new % _UINT64 if amount > 0 else max(0, new)
        text = str(new).encode()
        if len(text) <= len(item[0]):
            # memcached writes a number that fits in place, padded with spaces to the
            # old length ("10" decr 5 reads back as "5 ").
            text = text.ljust(len(item[0]), b" ")
        self._items[key] = (text, self._next_cas, item[2])
        self._next_cas += 1
        return new

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, method)(*args, **kwargs)

    def send(self, method: str, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("noreply", None)
        getattr(self, method)(*args, **kwargs)


def _delta(value: int) -> int:
    """An incr or decr amount: memcached takes an unsigned 64-bit number, nothing else."""
    amount = int(value)
    if not 0 <= amount < _UINT64:
        raise MemcacheClientError(b"invalid numeric delta argument")
    return amount


# What memcached's safe_strtoull takes: strtoull's leading whitespace and sign, digits,
# then the end, whitespace or a NUL (anything may follow those).
_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)(?:[ \t\n\v\f\r\x00]|$)")


def _as_number(raw: bytes) -> int | None:
    """The number memcached's incr and decr read in ``raw``, or None (not numeric)."""
    found = _NUMBER.match(raw)
    if found is None or int(found.group(2)) >= _UINT64:
        return None  # no digits, something else after them, or out of range (ERANGE)
    sign, number = found.group(1), int(found.group(2))
    if sign == b"-":
        # strtoull negates in unsigned arithmetic; memcached refuses what then reads as
        # a negative signed number ("-1"), and takes the rest ("-18446744073709551615": 1).
        number = -number % _UINT64
        if number >= 2**63:
            return None
    return number

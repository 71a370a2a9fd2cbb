"""Checks on what callers hand us, run before anything is written."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

# Datastore stores integers as signed 64-bit values; a shard can hold no more.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# An indexed string property (the shard's `name`) holds at most 1,500 bytes.
MAX_NAME_BYTES = 1500


#: Counter names that start with this are the library's own (a time series' bucket
#: counters): ``check_name`` refuses it to every other name, so no user name can
#: be one of them.
INTERNAL_PREFIX = "\x00sc:"


class InternalName(str):
    """A counter name the library made for itself, from ``internal_name``."""

    __slots__ = ()


def internal_name(*parts: str) -> InternalName:
    """The name of a counter of the library's own: ``INTERNAL_PREFIX`` and the parts,
    each length-prefixed, so no two tuples of parts give one name."""
    return InternalName(INTERNAL_PREFIX + "".join(f"{len(part)}:{part}" for part in parts))


def check_name(name: Any) -> str:
    """Return ``name`` if it can name a counter, else raise TypeError/ValueError."""
    checked = check_text(name, "counter name", MAX_NAME_BYTES)
    if checked.startswith(INTERNAL_PREFIX) and not isinstance(name, InternalName):
        raise ValueError(
            f"counter names starting with {INTERNAL_PREFIX!r} are the library's own "
            "(a time series' bucket counters)"
        )
    return checked


def check_text(value: Any, what: str, max_bytes: int) -> str:
    """Return ``value`` if it is a non-empty str Datastore can store in at most
    ``max_bytes`` of UTF-8, else raise TypeError/ValueError naming ``what``."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        # Lone surrogates cannot be stored by Datastore (it keeps UTF-8).
        raise ValueError(f"{what} is not valid unicode text: {exc.reason}") from None
    if size > max_bytes:
        raise ValueError(f"{what} is {size} bytes in UTF-8; at most {max_bytes} are allowed")
    return value


def check_delta(delta: Any) -> int:
    """Return ``delta`` if it is an int a shard can take, else raise TypeError/ValueError."""
    # bool is an int subclass, but increment(True) is almost certainly a bug.
    if isinstance(delta, bool) or not isinstance(delta, int):
        raise TypeError(f"increment must be an int, not {type(delta).__name__}")
    if not INT64_MIN <= delta <= INT64_MAX:
        raise ValueError(f"increment {delta} is outside the signed 64-bit range of a shard")
    return int(delta)


def check_value(value: Any, shards: int) -> int:
    """Return ``value`` if ``count = value`` can be stored across ``shards`` shards."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"count must be an int, not {type(value).__name__}")
    if not shards * INT64_MIN <= value <= shards * INT64_MAX:
        raise ValueError(f"count {value} does not fit in {shards} signed 64-bit shards")
    return int(value)


def check_shards(shards: Any) -> int:
    """Return ``shards`` if it is a usable shard count."""
    if isinstance(shards, bool) or not isinstance(shards, int):
        raise TypeError(f"shards must be an int, not {type(shards).__name__}")
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    if shards > 10_000:
        # Every uncached read and every `count = v` touches all shards.
        raise ValueError(f"shards must be at most 10000, not {shards}")
    return shards


def fits_int64(value: int) -> bool:
    return INT64_MIN <= value <= INT64_MAX


#: The longest idempotency key accepted, in UTF-8 bytes: Datastore's limit on a key name.
MAX_IDEMPOTENCY_KEY_BYTES = 1500


def check_idempotency_key(key: Any) -> str:
    """Return ``key`` if it can be an idempotency key, else raise TypeError/ValueError."""
    return check_text(key, "idempotency_key", MAX_IDEMPOTENCY_KEY_BYTES)


# -- settings and constructor arguments ------------------------------------------------
# One rule per kind of value, shared by the settings and by every class's arguments:
# TypeError for a wrong type, ValueError for a value out of range (settings.py turns
# them into ConfigurationTypeError / ConfigurationError).

#: The longest timeout, deadline or wait any setting or argument may give, in seconds:
#: an hour. Longer is almost surely a unit mistake, and a huge one (1e308) overflows
#: the socket, gRPC or thread timeout it reaches, failing far from where it was set.
MAX_SECONDS = 3600.0

#: The longest memcached expiry, in seconds: 30 days. memcached reads a relative
#: expiry above that as a unix timestamp, which is in the past: the item would be
#: gone at once. Every memcached TTL we are given must be 1 s to 30 days.
MAX_MEMCACHED_TTL = 30 * 24 * 3600


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """Return ``value`` if it is an int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be {low} to {high}, not {value}")
    return int(value)


def check_seconds(
    value: Any, what: str, *, zero_ok: bool = False, maximum: float = MAX_SECONDS
) -> float:
    """Return ``value`` as float seconds if it is a finite number, more than 0 (or
    0 with ``zero_ok``), and at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    low_ok = value >= 0 if zero_ok else value > 0
    if not math.isfinite(value) or not low_ok or value > maximum:
        low = "0" if zero_ok else "more than 0"
        raise ValueError(f"{what} must be {low} to {maximum:g} seconds, not {value!r}")
    return float(value)


def check_memcached_ttl(value: Any, what: str) -> int:
    """Return ``value`` if it is a memcached expiry: whole seconds, 1 s to 30 days."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be whole seconds (an int), not {type(value).__name__}")
    return check_int(value, what, 1, MAX_MEMCACHED_TTL)


def check_flag(value: Any, what: str) -> bool:
    """Return ``value`` if it is a bool (not 0/1 or "yes": a typo should not pass)."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, not {type(value).__name__}")
    return value


def check_choice(value: Any, what: str, choices: Collection[str]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, not {value!r}")
    return value


def check_host_port(spec: Any, what: str = "memcached host") -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) into its parts: a host of printable ASCII
    without spaces, and a port of ASCII digits from 1 to 65535."""
    if not isinstance(spec, str):
        raise TypeError(f"{what} must be a 'host:port' str, not {type(spec).__name__}")
    host, sep, port = spec.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # str.isdigit() also takes other scripts' digits ("٨٠"), which int() reads but a
    # socket address must not hold.
    port_ok = port.isascii() and port.isdigit() and 0 < int(port) < 65536
    host_ok = bool(host) and all("!" <= ch <= "~" for ch in host)
    if not sep or not host_ok or not port_ok:
        raise ValueError(
            f"{what} must look like 'host:port' (port 1-65535, ASCII digits), not {spec!r}"
        )
    return host, int(port)

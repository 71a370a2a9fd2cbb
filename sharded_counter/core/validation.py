"""Checks on what callers hand us, run before anything is written."""

from __future__ import annotations

from typing import Any

# Datastore stores integers as signed 64-bit values; a shard can hold no more.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# An indexed string property (the shard's `name`) holds at most 1,500 bytes.
MAX_NAME_BYTES = 1500


def check_name(name: Any) -> str:
    """Return ``name`` if it can name a counter, else raise TypeError/ValueError."""
    return check_text(name, "counter name", MAX_NAME_BYTES)


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

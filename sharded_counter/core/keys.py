"""How counter names become Datastore key names and memcache keys.

Shard key names are ``"<index>:<name>"``; when that would pass Datastore's
1,500-byte key-name limit they are ``"<index>#<sha256 of name>"``. The index is
digits only and the separator says which form it is, so two different
(name, index) pairs never share a key name (the App Engine original's
``'Shard' + name + str(index)`` mixes up ``('a1', 1)`` and ``('a', 11)``), and
no key name can look reserved (``__x__``) because it starts with a digit.

memcache keys never contain the name itself: they carry a hash of the project,
database, namespace and name, so any unicode name gives a short key of
printable ASCII, and one memcached can serve several projects.
"""

from __future__ import annotations

import hashlib

SHARD_KIND = "CounterShard"
IDEMPOTENCY_KIND = "CounterIdempotencyKey"
_MAX_KEY_NAME_BYTES = 1500


def shard_key_name(name: str, index: int) -> str:
    readable = f"{index}:{name}"
    if len(readable.encode("utf-8")) <= _MAX_KEY_NAME_BYTES:
        return readable
    return f"{index}#{hashlib.sha256(name.encode('utf-8')).hexdigest()}"


def idempotency_record_name(name: str, key: str) -> str:
    """The key name of the record that idempotency key ``key`` was applied to ``name``.

    ``"<len(name)>:<name>:<key>"``: the length says where the name ends, so no two
    (name, key) pairs share a record. When that passes the key-name limit it is
    ``"#<sha256 of the same>"``. Either form starts with a digit or ``#``, never
    with the reserved ``__``.
    """
    readable = f"{len(name)}:{name}:{key}"
    if len(readable.encode("utf-8")) <= _MAX_KEY_NAME_BYTES:
        return readable
    return "#" + hashlib.sha256(readable.encode("utf-8")).hexdigest()


def shard_index(name: str, key_name: str | None) -> int | None:
    """The index of one of our shards, or None for a shard written by anyone else."""
    if not key_name:
        return None
    digits = ""
    for ch in key_name:
        if not ch.isascii() or not ch.isdigit():
            break
        digits += ch
    if not digits or (len(digits) > 1 and digits[0] == "0"):
        return None
    index = int(digits)
    return index if shard_key_name(name, index) == key_name else None


def cache_keys(prefix: str, scope: str, name: str) -> tuple[str, str]:
    """(cached record key, delayed_incr key) for a counter: at most 250 bytes of ASCII."""
    digest = hashlib.blake2b(f"{scope}\x00{name}".encode(), digest_size=20).hexdigest()
    return f"{prefix}:t:{digest}", f"{prefix}:delayed_incr:{digest}"


def lease_key(record_key: str, index: int) -> str:
    """The memcache key of the lease on shard ``index`` of the counter whose cached
    record is ``record_key`` (cache/leases.py)."""
    return f"{record_key}:l{index}"

"""Which counters have amounts waiting in memcache for a shared buffer's flusher.

A ``SharedBuffer`` (patterns/shared_buffer.py) adds its increments to each
counter's ``delayed_incr`` stash; a flusher in any process must find the
counters to write. Their names are kept here, in memcache too: spread over
``BUCKETS`` keys by a hash of the name, so writers of different counters
rarely touch the same key, each bucket a list of names appended to with
memcached's ``append`` (one round trip, no race to lose). A flusher takes a
bucket whole with ``gets`` and a ``cas`` back to empty: two flushers never
take the same entry. A name may be listed twice; the flush of the second finds
nothing pending and writes nothing.

Losing an entry loses no amount: the stash still holds it, reads still count
it, and a writer lists the name again at its next increment once the flusher's
interval has passed (the shared buffer sees to that).

An entry that is not one we could have written (not strict URL-safe base64 of a
name of at most 1,500 bytes of UTF-8) is *poisoned*: it is dropped with a log
line, and the rest of its bucket is flushed as usual.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import re

from ..core import parse
from ..errors import CacheUnavailable
from .cas import change_key
from .client import key_digest
from .guarded import GuardedClient

log = logging.getLogger("sharded_counter")

BUCKETS = 32
_SEPARATOR = b"\n"
#: The longest name a counter may have, in bytes of UTF-8 (Datastore's key name limit).
MAX_NAME_BYTES = 1500
# One entry as _encode writes it: URL-safe base64, padded, of at most MAX_NAME_BYTES.
_ENTRY = re.compile(rb"(?:[A-Za-z0-9_-]{4}){0,500}(?:[A-Za-z0-9_-]{2}==|[A-Za-z0-9_-]{3}=)?")


class PendingNames:
    """The list of counters with something pending, in one scope."""

    def __init__(self, calls: GuardedClient, key_prefix: str, scope: str) -> None:
        self._calls = calls
        base = f"{key_prefix}:pn:{key_digest(scope)}"
        self.keys = [f"{base}:{bucket}" for bucket in range(BUCKETS)]

    def _bucket_of(self, name: str) -> str:
        digest = hashlib.blake2b(name.encode("utf-8"), digest_size=4).digest()
        return self.keys[int.from_bytes(digest, "big") % BUCKETS]

    def register(self, name: str) -> None:
        """List ``name``: one ``append``, or an ``add`` for a bucket not made yet. Raises
        CacheUnavailable."""
        key, entry = self._bucket_of(name), _encode(name)
        for _ in range(3):
            if self._calls.append(key, entry) or self._calls.add(key, entry):
                return
            # The bucket vanished between the two (a flusher's take leaves it empty, not
            # missing, so only eviction does that): try the append again.
        raise CacheUnavailable(f"could not list {name!r} in {key}: it kept vanishing")

    def take(self) -> set[str]:
        """Take every listed name, leaving the buckets empty. Raises CacheUnavailable."""
        found = self._calls.get_many(self.keys)
        taken: set[str] = set()
        for key, raw in found.items():
            if not raw:
                continue
            names = change_key(
                self._calls, key, lambda seen: (_decode(seen), b"" if seen else None), expire=0
            )
            taken |= names
        return taken

    def peek(self) -> set[str]:
        """The names listed now, without taking them."""
        found = self._calls.get_many(self.keys)
        return {name for raw in found.values() for name in _decode(raw)}


def _encode(name: str) -> bytes:
    # Names are any unicode, newlines included: base64 keeps an entry on one line.
    return base64.urlsafe_b64encode(name.encode("utf-8")) + _SEPARATOR


def _decode(raw: bytes | None) -> set[str]:
    """The names listed in a bucket; a poisoned entry is dropped (and logged)."""
    if not raw:
        return set()
    names: set[str] = set()
    for entry in raw.split(_SEPARATOR):
        if entry:
            try:
                names.add(_name_of(entry))
            except parse.Garbled as exc:
                _report_poisoned(parse.fingerprint(entry), parse.describe(entry), str(exc))
    return names


def _name_of(entry: bytes) -> str:
    """The counter name ``entry`` lists, strictly as ``_encode`` wrote it."""
    if not _ENTRY.fullmatch(entry):
        raise parse.Garbled("not URL-safe base64 of a name of at most 1,500 bytes")
    try:
        name = base64.b64decode(entry, altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise parse.Garbled(f"not a name: {exc}") from exc
    if not 0 < len(name.encode("utf-8")) <= MAX_NAME_BYTES:
        raise parse.Garbled("a name must be 1 to 1,500 bytes of UTF-8")
    return name


@functools.lru_cache(maxsize=256)
def _report_poisoned(fingerprint: str, shown: str, why: str) -> None:
    """Log a poisoned entry once (by ``fingerprint``, while among the last 256): a peek
    and a take both see it."""
    log.warning(
        "a shared buffer's list of pending counters in memcache holds an entry that is not "
        "a name we listed (%s): %s; dropped, the other names are flushed (docs/security.md)",
        why,
        shown,
    )

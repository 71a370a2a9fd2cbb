"""The cached total: what one memcache value holds, and how writers merge into it.

Rather than one number that every writer ``incr``s (which a refill racing an
increment can double-count or lose), the cache holds every shard's last known
``(version, value)``. Datastore gives each entity a version that grows with
every write, so merging is "keep the higher version per shard": it can be
repeated, reordered or arrive late and the result is the same. The total is
the sum of the values.

A record is *complete* once a reader has merged a full snapshot of the shards
into it; writers only merge into whatever record exists (or start a partial
one), and readers trust complete records only. The *epoch* names one lifetime
of the record: a reader that sees the epoch change while it was reading the
shards knows the record was evicted meanwhile and does not trust its snapshot.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import secrets
from collections.abc import Iterable

from . import parse

_FORMAT = "r1"
#: The longest record we read: 10,000 shards (the most a counter may have) of about
#: 50 bytes each, and room for shards written by others.
MAX_RECORD_BYTES = 1_000_000
#: Shard indexes run below the most shards a counter may have (core/validation.py).
MAX_SHARDS = 10_000
# A shard's id as ``store/entities.shard_id`` makes it: ``i<index>``, or ``k`` and
# 12 hex digits for a shard written by anyone else; and an epoch, 12 hex digits.
_FOREIGN_SHARD = re.compile(r"k[0-9a-f]{12}", re.ASCII)
_EPOCH = re.compile(r"[0-9a-f]{12}", re.ASCII)


@dataclasses.dataclass(frozen=True)
class ShardState:
    """One shard as Datastore last reported it."""

    shard_id: str  # "i<index>" for our shards, "k<hash>" for foreign ones
    version: int
    value: int


@dataclasses.dataclass(frozen=True)
class Record:
    epoch: str
    complete: bool
    shards: dict[str, tuple[int, int]]  # shard_id -> (version, value)

    @classmethod
    def new(cls, states: Iterable[ShardState] = ()) -> Record:
        return cls(secrets.token_hex(6), False, {}).merged(states)

    @functools.cached_property
    def total(self) -> int:
        # Summed once per record: records never change (merged() copies), and decode
        # hands a hot counter's readers the same one again and again.
        return sum(value for _, value in self.shards.values())

    def merged(self, states: Iterable[ShardState], *, complete: bool | None = None) -> Record:
        shards = dict(self.shards)
        for state in states:
            known = shards.get(state.shard_id)
            if known is None or state.version > known[0]:
                shards[state.shard_id] = (state.version, state.value)
        done = self.complete if complete is None else complete
        return Record(self.epoch, done, shards)

    def encode(self) -> bytes:
        body = ",".join(f"{sid}={ver}:{val}" for sid, (ver, val) in sorted(self.shards.items()))
        return f"{_FORMAT}|{self.epoch}|{'c' if self.complete else 'p'}|{body}".encode("ascii")

    @classmethod
    def decode(cls, raw: bytes) -> Record | None:
        """The record in ``raw``, or None when it is not one we wrote (treated as a miss,
        so the record is read again from Datastore).

        Remembered by value: a hot counter's readers mostly see the same bytes
        again, and parsing twenty shards costs more than the memcache get.
        """
        return _decode(bytes(raw))

    @classmethod
    def parse(cls, raw: bytes) -> Record:
        """The record in ``raw``, strictly: raises ``parse.Garbled`` unless it is exactly
        what ``encode`` writes (its format and epoch, each shard id once and in order,
        within a counter's shards, and every version and value within int64)."""
        fields = parse.text(raw, limit=MAX_RECORD_BYTES).split("|")
        if len(fields) != 4:
            raise parse.Garbled(f"a record has 4 fields, not {len(fields)}")
        fmt, epoch, state, body = fields
        if fmt != _FORMAT or state not in ("c", "p") or not _EPOCH.fullmatch(epoch):
            raise parse.Garbled(f"not a record's header: {parse.describe(raw)}")
        shards: dict[str, tuple[int, int]] = {}
        last = ""  # encode writes shards sorted by id: anything else is not ours
        for item in body.split(",") if body else ():
            sid, equals, pair = item.partition("=")
            ver, colon, val = pair.partition(":")
            if not (equals and colon):
                raise parse.Garbled(f"not a shard's entry: {item[:80]!r}")
            if sid <= last:
                raise parse.Garbled(f"shard {sid[:80]!r} repeated or out of order")
            shards[_shard_id(sid)] = (parse.integer(ver, lo=0), parse.integer(val))
            last = sid
        return cls(epoch, state == "c", shards)

    @classmethod
    def _parse(cls, raw: bytes) -> Record | None:
        try:
            return cls.parse(raw)
        except parse.Garbled:
            return None


def _shard_id(sid: str) -> str:
    """``sid`` if it names one of a counter's shards as ``store/entities.shard_id`` does."""
    if sid.startswith("i"):
        parse.integer(sid[1:], lo=0, hi=MAX_SHARDS - 1)
    elif not _FOREIGN_SHARD.fullmatch(sid):
        raise parse.Garbled(f"not a shard id: {sid[:80]!r}")
    return sid


#: The decode cache's bounds: entries, and the largest value it keeps (its key is the
#: value itself). A record of 40 shards, each at the largest version and value, is
#: under 2 KiB; a larger value (a record of more shards, or garbage) is parsed each
#: time rather than held.
DECODE_CACHE_ENTRIES = 1024
DECODE_CACHE_MAX_VALUE = 2048


def _decode(raw: bytes) -> Record | None:
    if len(raw) > DECODE_CACHE_MAX_VALUE:
        return Record._parse(raw)
    return _decode_cached(raw)


@functools.lru_cache(maxsize=DECODE_CACHE_ENTRIES)
def _decode_cached(raw: bytes) -> Record | None:
    # Records are never changed in place (merged() copies), so sharing one is safe.
    return Record._parse(raw)


@dataclasses.dataclass(frozen=True)
class Drift:
    """How a cached record compares with a fresh read of the shards."""

    stale: int  # shards the record holds at an older version, or lacks
    difference: int  # what those stale entries add to the cached total beyond the truth

    @classmethod
    def between(cls, record: Record, truth: Iterable[ShardState]) -> Drift:
        """Compare shard by shard: a newer version in the record is a later write, not drift."""
        stale = difference = 0
        seen = set()
        for state in truth:
            seen.add(state.shard_id)
            version, value = record.shards.get(state.shard_id, (0, 0))
            if version < state.version or (version == state.version and value != state.value):
                stale += 1
                difference += value - state.value
        for shard_id, (_, value) in record.shards.items():
            if shard_id not in seen and value:  # cached, but gone from Datastore
                stale += 1
                difference += value
        return cls(stale, difference)

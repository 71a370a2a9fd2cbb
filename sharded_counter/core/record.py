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
import secrets
from collections.abc import Iterable

_FORMAT = "r1"


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

    @property
    def total(self) -> int:
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
        """The record in ``raw``, or None when it is not one we wrote (treated as a miss).

        Remembered by value: a hot counter's readers mostly see the same bytes
        again, and parsing twenty shards costs more than the memcache get.
        """
        return _decode(bytes(raw))

    @classmethod
    def _parse(cls, raw: bytes) -> Record | None:
        try:
            fmt, epoch, state, body = raw.decode("ascii").split("|")
            if fmt != _FORMAT or state not in ("c", "p"):
                return None
            shards: dict[str, tuple[int, int]] = {}
            for item in body.split(",") if body else ():
                sid, _, pair = item.partition("=")
                ver, _, val = pair.partition(":")
                shards[sid] = (int(ver), int(val))
        except ValueError:
            return None
        return cls(epoch, state == "c", shards)


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

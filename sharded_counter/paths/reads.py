"""Reading totals: one counter's, many at once, and the check of a cached total.

A read trusts a complete cached record (``core/record.py``) plus what
delayed_incr owes; otherwise it sums every ``CounterShard`` of the name and
fills the record safely. Unsure writes it sees are resolved first, so a read
after a write whose outcome was unknown counts it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from ..core.effects import Steps, retrying
from ..core.record import Drift, Record, ShardState
from ..errors import CacheUnavailable
from ..store.retry import write_policy
from ..store.shards import Snapshot
from ..telemetry import telemetry
from .context import CounterContext
from .unsure import UnsureResolver

#: A cache read: the complete record (or None) and what the stash owes.
CachedRead = tuple[Record | None, int]
_HIT = {"cache_hits": 1}  # the telemetry of a cached read, made once


@dataclasses.dataclass(frozen=True)
class Verification:
    """One counter's cached total against its shards (see ``Counter.verify``)."""

    name: str
    cached: int | None  # the cached total (record + pending), None when not cached
    shards: int  # the sum of every shard
    pending: int  # what delayed_incr holds: pending, and writes of unknown outcome
    stale_shards: int  # shards the cache holds at an older version, or lacks
    drift: int  # how far the cached total is off because of them

    @property
    def ok(self) -> bool:
        return self.stale_shards == 0


class Reader:
    """Reads of one counter, from this process."""

    def __init__(self, ctx: CounterContext, resolver: UnsureResolver) -> None:
        self.ctx = ctx
        self.resolver = resolver

    def total(self, *, nocache: bool = False, first: CachedRead | None = None) -> Steps[int]:
        """The counter's total (see ``Counter.get_count``); ``first``: the cache's read,
        made already (``total_here``)."""
        ctx = self.ctx
        enabled, cache = ctx.backend.cache.enabled, ctx.backend.cache.steps
        if not nocache and enabled:
            try:
                if first is None:
                    record, stash = yield from cache.read(ctx.record_key, ctx.stash_key)
                else:
                    record, stash = first
                if cache.unsure_seen(ctx.stash_key) and (yield from self.resolver.resolve()):
                    record, stash = yield from cache.read(ctx.record_key, ctx.stash_key)
                if record is not None:
                    telemetry().events(_HIT)
                    return record.total + stash
                telemetry().events({"cache_misses": 1})
                total = yield from cache.fill(ctx.record_key, self._shard_states)
                return total + stash
            except CacheUnavailable:
                pass
        if enabled:
            yield from self.resolver.resolve(look=True)
        snapshot = yield from self.snapshot()
        pending = yield from self.pending()
        return snapshot.total + pending

    def total_here(self) -> int:
        """``total()`` carried out in this thread by the blocking shell, the cached read
        first as plain calls: a complete record with no unsure writes to resolve (a hot
        counter's read) is answered without driving steps, which cost as much as the
        rest of the read; anything else goes on as ``total``'s steps from that same
        read, so no read takes a round trip more or a different turn."""
        ctx = self.ctx
        tier = ctx.backend.cache
        if not tier.enabled:
            return ctx.run(self.total())
        try:
            first = tier.read_now(ctx.record_key, ctx.stash_key)
        except CacheUnavailable:
            # Where total() goes when its read fails: the shards, as nocache reads them.
            return ctx.run(self.total(nocache=True))
        if first is None:  # a backlog to catch up first: the steps do it
            return ctx.run(self.total())
        record, stash = first
        if record is not None and not tier.steps.sightings.unsure_seen(ctx.stash_key):
            telemetry().events(_HIT)
            return record.total + stash
        return ctx.run(self.total(first=first))

    def _shard_states(self, keys: list[str]) -> Steps[Mapping[str, Iterable[ShardState]]]:
        snapshot = yield from self.snapshot()
        return {key: snapshot.states for key in keys}

    def snapshot(self) -> Steps[Snapshot]:
        """Every shard, read under the same retry policy as the writes."""
        ctx = self.ctx
        snapshot: Snapshot = yield from retrying(
            write_policy(ctx.settings), ctx.backend.store.snapshot, ctx.name
        )
        return snapshot

    def pending(self) -> Steps[int]:
        """What delayed_incr owes the counter (0 without memcache, or when it is down)."""
        if not self.ctx.backend.cache.enabled:
            return 0
        try:
            owed: int = yield from self.ctx.backend.cache.steps.stashes.peek_stash(
                self.ctx.stash_key
            )
        except CacheUnavailable:
            return 0
        return owed

    def rebuild_cached_record(self) -> Steps[None]:
        """Drop the cached record and fill it afresh from the shards."""
        cache = self.ctx.backend.cache.steps
        yield from cache.forget(self.ctx.record_key)
        yield from cache.fill(self.ctx.record_key, self._shard_states)

    def verify(self) -> Steps[Verification]:
        """Compare the cached record with the shards (see ``Counter.verify``)."""
        ctx = self.ctx
        enabled, cache = ctx.backend.cache.enabled, ctx.backend.cache.steps
        record = (yield from cache.records.peek(ctx.record_key)) if enabled else None
        pending = (yield from cache.stashes.peek_stash(ctx.stash_key)) if enabled else 0
        snapshot = yield from self.snapshot()
        cached = record if record is not None and record.complete else None
        drift = Drift.between(cached, snapshot.states) if cached is not None else Drift(0, 0)
        return Verification(
            name=ctx.name,
            cached=None if cached is None else cached.total + pending,
            shards=snapshot.total,
            pending=pending,
            stale_shards=drift.stale,
            drift=drift.difference,
        )


def read_many(
    contexts: Sequence[CounterContext], *, nocache: bool = False
) -> Steps[dict[str, int]]:
    """Totals of many counters sharing one backend and settings (``Counter.get_counts``).

    One memcache ``get_many`` for all of them, then one Datastore read for all
    the misses, cached as a single read would.
    """
    if not contexts:
        return {}
    first = contexts[0]
    enabled, cache = first.backend.cache.enabled, first.backend.cache.steps
    cache_down = False
    if not nocache and enabled:
        try:
            totals: dict[str, int] = yield from _through_cache(contexts)
        except CacheUnavailable:
            cache_down = True  # then no stash can be read either
        else:
            return totals
    pending: dict[str, int] = {}
    if enabled and not cache_down:
        with contextlib.suppress(CacheUnavailable):
            pending = yield from cache.stashes.peek_stashes([c.stash_key for c in contexts])
    found = yield from _snapshots(first, [c.name for c in contexts])
    return {c.name: found[c.name].total + pending.get(c.stash_key, 0) for c in contexts}


def _through_cache(contexts: Sequence[CounterContext]) -> Steps[dict[str, int]]:
    first = contexts[0]
    cache = first.backend.cache.steps
    totals: dict[str, int] = {}
    stashes: dict[str, int] = {}
    misses: dict[str, CounterContext] = {}
    pairs = [(c.record_key, c.stash_key) for c in contexts]
    read = yield from cache.records.read_many(pairs)
    for ctx, (record, stash) in zip(contexts, read, strict=True):
        if record is not None:
            totals[ctx.name] = record.total + stash
        else:
            misses[ctx.record_key] = ctx
            stashes[ctx.record_key] = stash

    def read_shards(keys: list[str]) -> Steps[Mapping[str, Iterable[ShardState]]]:
        found = yield from _snapshots(first, [misses[k].name for k in keys])
        return {k: found[misses[k].name].states for k in keys}

    filled = yield from cache.records.fill_many(list(misses), read_shards)
    for key, ctx in misses.items():
        totals[ctx.name] = filled[key] + stashes[key]
    return totals


def _snapshots(ctx: CounterContext, names: list[str]) -> Steps[dict[str, Snapshot]]:
    backend = ctx.backend

    def attempt() -> Steps[dict[str, Snapshot]]:
        yield from backend.probed()  # the classic engine refuses IN filters
        found: dict[str, Snapshot] = yield from backend.store.snapshots(
            names, use_in=backend.is_firestore
        )
        return found

    snapshots: dict[str, Snapshot] = yield from retrying(write_policy(ctx.settings), attempt)
    return snapshots

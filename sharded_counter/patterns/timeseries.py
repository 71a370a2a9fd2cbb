"""Counts per time bucket, at several resolutions, in memcache.

``TimeSeries('hits', resolutions=[(10, 3600), (60, 86400)])`` keeps, for every key,
one memcache counter per 10-second bucket for an hour and one per minute for a
day. ``incr`` bumps the bucket of every resolution. ``sum`` and ``series`` fetch
every bucket they need with one ``get_many``.

**Which buckets a sum reads.** A range is first widened to the finest
resolution's bucket edges: every bucket that overlaps ``[start, end)`` counts.
It is then covered from left to right, each time with the coarsest bucket that
starts exactly there, ends inside the range, and is still retained. So an hour
aligned to minutes costs 60 keys, not 360. A range reaching further back than
the finest resolution keeps must be aligned to a coarser one there, or
``ValueError`` says so, rather than returning a sum with a hole in it. Each
resolution must be a multiple of the finer ones, so the buckets nest.

**Only up.** memcached's ``incr`` is unsigned and ``decr`` stops at 0. A
negative ``n`` could not be applied faithfully, so it raises ``ValueError``.
Keep a second series for the decrements.

**Durability.** Buckets are cache data: an eviction or a restart loses them.
With ``durable=True``, ``rollup(key)`` moves complete buckets into sharded
``Counter``s in Datastore, one per bucket. Reads then add each complete
bucket's Counter to what memcache still holds, so history survives a cache
loss (one Counter read per bucket: keep durable ranges coarse). Roll up more
often than the shortest retention, or buckets expire before they are moved.

**A move, exactly once.** A bucket's amount is written to its Counter first,
under an idempotency key, and only then subtracted from memcache (``decr``,
so a late event that arrived meanwhile stays). A move record in memcache
(``add``: one mover per bucket) holds the key and the amount until the move
is done. A write that certainly failed leaves the bucket as it was; one whose
outcome is unknown, or a mover that died, leaves the record, and a later
rollup, once the record's deadline passed, finishes that move with the same
key: counted once. Bucket counters have names of the library's own
(``core/validation.internal_name``), which no user's ``Counter`` can take.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..cache.cas import on
from ..cache.client import CLIENT_ERRORS, ClientSource, CommandClient, incr_or_add, key_digest
from ..core import parse
from ..core.effects import drive
from ..core.tokens import new_token
from ..core.validation import check_flag, check_text, internal_name
from ..counter import Counter, class_options
from ..errors import CacheUnavailable, IncrementNotRecorded
from ..settings import Settings, resolve

log = logging.getLogger("sharded_counter")

#: memcached reads a relative expiry above 30 days as a unix timestamp.
MAX_RETENTION = 30 * 24 * 3600
#: A guard against a query that would fetch millions of keys by mistake.
MAX_BUCKETS = 100_000
#: memcached's counters are unsigned 64-bit.
MAX_INCREMENT = 2**62

Instant = float | int | dt.datetime


@dataclasses.dataclass(frozen=True)
class Resolution:
    """Buckets of ``seconds`` each, kept for ``retention`` seconds after they end."""

    seconds: int
    retention: int

    def start_of(self, t: float) -> int:
        return math.floor(t / self.seconds) * self.seconds

    def edge_after(self, t: float) -> int:
        """The first bucket edge at or after ``t``."""
        return math.ceil(t / self.seconds) * self.seconds

    def retained(self, bucket_start: int, now: float) -> bool:
        return bucket_start + self.seconds + self.retention > now


class TimeSeries:
    """Bucketed counts per key at several resolutions (see the module docstring).

    ``name_prefix`` names the series: two series with different names never
    share a bucket. ``resolutions`` is a list of ``(bucket seconds, retention
    seconds)``. Without ``memcache_client`` the servers come from the settings
    (``cache_url`` or ``memcached_hosts`` here, else ``SHARDED_COUNTER_CACHE_URL``,
    ``MEMCACHED_HOSTS`` or the config).
    ``counter_options`` go to the ``Counter`` of each bucket when ``durable``.
    """

    def __init__(
        self,
        name_prefix: str,
        resolutions: Sequence[tuple[int, int]] = ((10, 3600), (60, 86400)),
        *,
        memcache_client: CommandClient | None = None,
        memcached_hosts: str | list[str] | tuple[str, ...] | None = None,
        cache_url: str | None = None,
        key_prefix: str | None = None,
        durable: bool = False,
        counter_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name_prefix = check_text(name_prefix, "name_prefix", 256)
        self.resolutions = _check_resolutions(resolutions)
        self.durable = check_flag(durable, "durable")
        if counter_options is not None and not isinstance(counter_options, Mapping):
            raise TypeError(f"counter_options must be a dict, not {type(counter_options).__name__}")
        self._counter_options = dict(counter_options or {})
        if memcached_hosts is not None:
            self._counter_options.setdefault("memcached_hosts", memcached_hosts)
        if cache_url is not None:
            self._counter_options.setdefault("cache_url", cache_url)
        # Bad options fail now, not at the first rollup; clients passed in are not options.
        self._counter_settings = resolve(
            {k: v for k, v in self._counter_options.items() if not k.endswith("_client")},
            class_options(Counter),
        )
        self._clock = clock
        self._client = ClientSource(
            memcache_client,
            memcached_hosts=memcached_hosts,
            cache_url=cache_url,
            key_prefix=key_prefix,
            what="TimeSeries",
        )

    def __repr__(self) -> str:
        pairs = [(r.seconds, r.retention) for r in self.resolutions]
        return f"TimeSeries({self.name_prefix!r}, resolutions={pairs})"

    # -- writing --------------------------------------------------------------------------

    def incr(self, key: str, n: int = 1, at: Instant | None = None) -> None:
        """Add ``n`` (0 or more) to the bucket holding ``at`` (default: now), at every resolution.

        Raises ``CacheUnavailable`` when memcache fails. Resolutions updated
        before the failure keep their increment: the buckets are counters, not a
        transaction.
        """
        digest = self._digest(key)
        n = _check_increment(n)
        now = self._clock()
        when = now if at is None else _seconds(at)
        if n == 0:
            return
        client = self._client()
        for res in self.resolutions:
            start = res.start_of(when)
            expire = math.ceil(start + res.seconds + res.retention - now)
            if expire <= 0:
                continue  # that bucket is past its retention already
            try:
                key = self._key(res, start, digest)
                drive(incr_or_add(key, n, min(expire, MAX_RETENTION)), on(client))
            except CLIENT_ERRORS as exc:
                raise CacheUnavailable(f"time series {self.name_prefix!r}: {exc}") from exc

    # -- reading --------------------------------------------------------------------------

    def sum(self, key: str, start: Instant, end: Instant) -> int:
        """Everything counted in the buckets overlapping ``[start, end)``."""
        digest = self._digest(key)
        plan = self._plan(*_range(start, end))
        return sum(self._counts(key, digest, plan))

    def plan(self, start: Instant, end: Instant) -> list[tuple[int, int]]:
        """The ``(bucket seconds, bucket start)`` pairs ``sum(key, start, end)`` reads."""
        return [(res.seconds, at) for res, at in self._plan(*_range(start, end))]

    def _plan(self, lo: float, hi: float) -> list[tuple[Resolution, int]]:
        if lo == hi:
            return []
        finest = self.resolutions[0]
        # Widened to the finest buckets' edges: every bucket overlapping the range counts.
        return self._cover(finest.start_of(lo), finest.edge_after(hi))

    def series(
        self, key: str, start: Instant, end: Instant, resolution: int
    ) -> list[tuple[int, int]]:
        """``(bucket start, count)`` per bucket of ``resolution`` overlapping ``[start, end)``."""
        digest = self._digest(key)
        res = self._resolution(resolution)
        lo, hi = _range(start, end)
        if lo == hi:
            return []
        first = res.start_of(lo)
        if (hi - first) / res.seconds > MAX_BUCKETS:
            raise ValueError(f"that range spans over {MAX_BUCKETS} buckets of {res.seconds} s")
        starts = list(range(first, math.ceil(hi), res.seconds))
        if not self.durable and not res.retained(first, self._clock()):
            raise ValueError(
                f"buckets of {res.seconds} s are kept {res.retention} s; "
                f"{_when(first)} is further back than that"
            )
        plan = [(res, s) for s in starts]
        return list(zip(starts, self._counts(key, digest, plan), strict=True))

    def _cover(self, lo: int, hi: int) -> list[tuple[Resolution, int]]:
        """The fewest buckets tiling ``[lo, hi)``: coarsest first wherever one fits."""
        now = self._clock()
        plan: list[tuple[Resolution, int]] = []
        at = lo
        while at < hi:
            for res in reversed(self.resolutions):
                fits = at % res.seconds == 0 and at + res.seconds <= hi
                if fits and (self.durable or res.retained(at, now)):
                    plan.append((res, at))
                    at += res.seconds
                    break
            else:
                raise ValueError(self._uncoverable(at, now))
            if len(plan) > MAX_BUCKETS:
                raise ValueError(f"that range needs over {MAX_BUCKETS} buckets")
        return plan

    def _uncoverable(self, at: int, now: float) -> str:
        held = [r for r in self.resolutions if r.retained(at - at % r.seconds, now)]
        if not held:
            return f"no resolution keeps buckets as old as {_when(at)}"
        coarse = held[0]
        return (
            f"only buckets of {coarse.seconds} s or more are kept as far back as {_when(at)}: "
            f"align the range's ends there to {coarse.seconds} s"
        )

    def _counts(self, key: str, digest: str, plan: list[tuple[Resolution, int]]) -> list[int]:
        keys = [self._key(res, start, digest) for res, start in plan]
        try:
            found = self._client().get_many(keys)  # the one round trip
        except CLIENT_ERRORS as exc:
            raise CacheUnavailable(f"time series {self.name_prefix!r}: {exc}") from exc
        counts = [_count(found.get(k)) for k in keys]
        if self.durable:
            now = self._clock()
            for i, (res, start) in enumerate(plan):
                if start + res.seconds <= now:  # only complete buckets are ever rolled up
                    counts[i] += self._bucket_counter(key, res, start).count
        return counts

    # -- durability -------------------------------------------------------------------------

    def rollup(self, key: str, before: Instant | None = None) -> int:
        """Move complete buckets that ended by ``before`` (default now) into Counters.

        Each bucket still in memcache with a count is written to its bucket's
        ``Counter`` under an idempotency key, then subtracted from memcache (see
        *A move, exactly once* in the module docstring). Returns the total moved.
        Raises the Counter's errors: after ``IncrementNotRecorded`` the bucket is
        as it was; after ``IncrementOutcomeUnknown`` a later rollup finishes the
        move, counted once. ``CacheUnavailable`` when memcache fails.
        """
        if not self.durable:
            raise ValueError("rollup needs a TimeSeries made with durable=True")
        digest = self._digest(key)
        now = self._clock()
        limit = now if before is None else min(_seconds(before), now)
        client = self._client()
        moved = 0
        for res in self.resolutions:
            oldest = res.start_of(now - res.retention - res.seconds)
            starts = range(oldest, res.start_of(limit) - res.seconds + 1, res.seconds)
            keys = {self._key(res, start, digest): start for start in starts}
            try:
                found = client.get_many(list(keys)) if keys else {}
            except CLIENT_ERRORS as exc:
                raise CacheUnavailable(f"time series {self.name_prefix!r}: {exc}") from exc
            for mkey, raw in found.items():
                moved += self._move(client, key, res, keys[mkey], mkey, _count(raw))
        return moved

    def _move(
        self, client: CommandClient, key: str, res: Resolution, start: int, mkey: str, amount: int
    ) -> int:
        expire = math.ceil(start + res.seconds + res.retention - self._clock())
        if amount == 0 or expire <= 0:
            return 0
        ttl, record = min(expire, MAX_RETENTION), mkey + _MOVE_SUFFIX
        try:
            move = self._hold(client, record, ttl)
            if move is not None and move.amount == 0:
                move = self._decide(client, record, mkey, move, ttl)
        except CLIENT_ERRORS as exc:
            raise CacheUnavailable(f"time series {self.name_prefix!r}: {exc}") from exc
        return 0 if move is None else self._finish(client, key, res, start, mkey, move)

    def _hold(self, client: CommandClient, record: str, ttl: int) -> _Move | None:
        """The bucket's move record, made (``add``: one mover per bucket) or taken over
        from a mover past its deadline (``cas``); None while another mover holds it."""
        # Rounded as the record writes it, so a record read back compares equal.
        deadline = round(self._clock() + _move_deadline(self._counter_settings), 3)
        fresh = _Move(new_token(), 0, deadline)  # amount 0: not decided yet
        if client.add(record, fresh.encode(), ttl):
            return fresh
        raw, token = client.gets(record)
        left = _Move.decode(raw)
        if left is None or left.deadline > self._clock():
            return None  # moved meanwhile, or its mover is still within its time
        # A mover that died or failed: finish its move, under its key.
        mine = dataclasses.replace(left, deadline=deadline)
        return mine if client.cas(record, mine.encode(), token, ttl) is True else None

    def _decide(
        self, client: CommandClient, record: str, mkey: str, move: _Move, ttl: int
    ) -> _Move | None:
        """Fix the amount to move: what the bucket holds now that this rollup holds its
        record (no one else subtracts meanwhile; later events stay for next time)."""
        amount = _count(client.get(mkey))
        if amount == 0:
            client.delete(record)
            return None
        raw, token = client.gets(record)
        decided = dataclasses.replace(move, amount=amount)
        if _Move.decode(raw) != move:
            return None  # past its deadline, another rollup took it over
        if client.cas(record, decided.encode(), token, ttl) is not True:
            return None
        return decided

    def _finish(
        self, client: CommandClient, key: str, res: Resolution, start: int, mkey: str, move: _Move
    ) -> int:
        """Write the move to the bucket's Counter under its key, then take it out of memcache."""
        try:
            self._bucket_counter(key, res, start).increment(move.amount, idempotency_key=move.key)
        except IncrementNotRecorded:
            # Certainly not counted: the bucket still holds the amount; drop the record.
            _forget(client, mkey + _MOVE_SUFFIX)
            raise
        # Any other failure leaves the record: a later rollup finishes the move with
        # the same key, so a write that landed is not counted again.
        try:
            client.decr(mkey, move.amount)  # floors at 0; a bucket evicted meanwhile: None
            client.delete(mkey + _MOVE_SUFFIX)
        except CLIENT_ERRORS as exc:
            raise CacheUnavailable(f"time series {self.name_prefix!r}: {exc}") from exc
        return move.amount

    def _bucket_counter(self, key: str, res: Resolution, start: int) -> Counter:
        # A name of the library's own, length-prefixed part by part: no user Counter and
        # no other (series, key, bucket) can have it.
        name = internal_name("ts", str(res.seconds), str(start), self.name_prefix, key)
        return Counter(name, **self._counter_options)

    # -- helpers ----------------------------------------------------------------------------

    def _digest(self, key: str) -> str:
        if not isinstance(key, str):
            raise TypeError(f"a time series key is a str, not {type(key).__name__}")
        return key_digest(self.name_prefix, key)

    def _key(self, res: Resolution, start: int, digest: str) -> str:
        return f"{self._client.key_prefix}:ts:{res.seconds}:{start // res.seconds}:{digest}"

    def _resolution(self, seconds: int) -> Resolution:
        for res in self.resolutions:
            if res.seconds == seconds:
                return res
        known = ", ".join(str(r.seconds) for r in self.resolutions)
        raise ValueError(f"resolution {seconds!r} is not one of this series' ({known})")


#: A bucket's move record is its memcache key plus this.
_MOVE_SUFFIX = ":mv"


@dataclasses.dataclass(frozen=True)
class _Move:
    """A move of ``amount`` from a bucket to its Counter under idempotency ``key``, by a
    rollup that has until ``deadline`` (unix seconds) before another may finish it."""

    key: str
    amount: int
    deadline: float

    def encode(self) -> bytes:
        return f"{self.key} {self.amount} {self.deadline:.3f}".encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> _Move | None:
        try:
            key, amount, deadline = (raw or b"").decode().split(" ")
            return cls(key, int(amount), float(deadline))
        except ValueError:
            return None  # gone, or not a record: nothing to resume


def _move_deadline(settings: Settings) -> float:
    """Seconds a mover has before another rollup may finish its move: as long as its
    Counter write may take, as a SharedBuffer flush lock lasts."""
    return settings.retry_deadline + 2 * settings.rpc_timeout + 2


def _forget(client: CommandClient, key: str) -> None:
    # Left behind, the record is taken over after its deadline: harmless, since
    # its key never counted and the bucket still holds the amount.
    with contextlib.suppress(*CLIENT_ERRORS):
        client.delete(key)


def _check_resolutions(resolutions: Iterable[tuple[int, int]]) -> tuple[Resolution, ...]:
    checked: list[Resolution] = []
    for pair in resolutions:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"a resolution is (bucket seconds, retention seconds), not {pair!r}")
        seconds, retention = pair
        for value in (seconds, retention):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"resolutions hold ints, not {value!r}")
        if seconds < 1 or not seconds <= retention <= MAX_RETENTION:
            raise ValueError(
                f"resolution ({seconds}, {retention}): buckets of 1 s or more, kept at least "
                f"one bucket and at most 30 days"
            )
        checked.append(Resolution(seconds, retention))
    checked.sort(key=lambda r: r.seconds)
    if not checked:
        raise ValueError("a TimeSeries needs at least one resolution")
    for finer, coarser in itertools.pairwise(checked):
        if coarser.seconds == finer.seconds or coarser.seconds % finer.seconds:
            raise ValueError(
                f"resolutions must be distinct multiples of each other (buckets nest): "
                f"{coarser.seconds} s is not a multiple of {finer.seconds} s"
            )
    return tuple(checked)


def _check_increment(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, not {type(n).__name__}")
    if n < 0:
        raise ValueError(
            f"a time series only counts up (memcached's incr is unsigned), not {n}; "
            "keep decrements in a series of their own"
        )
    if n > MAX_INCREMENT:
        raise ValueError(f"n must be at most 2**62, not {n}")
    return n


def _seconds(t: Instant) -> float:
    if isinstance(t, dt.datetime):
        if t.tzinfo is None:
            raise ValueError(f"use a timezone-aware datetime, not the naive {t.isoformat()}")
        return t.timestamp()
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"a time is unix seconds or an aware datetime, not {type(t).__name__}")
    if not math.isfinite(t):
        raise ValueError(f"a time must be finite, not {t!r}")
    return float(t)


def _range(start: Instant, end: Instant) -> tuple[float, float]:
    lo, hi = _seconds(start), _seconds(end)
    if hi < lo:
        raise ValueError(f"the range ends ({_when(hi)}) before it starts ({_when(lo)})")
    return lo, hi


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _count(raw: bytes | None) -> int:
    """A bucket's count; one that is not a count we could have made (core/parse.py)
    is skipped, with a log line: read as 0 and never rolled up (docs/security.md)."""
    if raw is None:
        return 0
    try:
        return parse.counter(raw, hi=parse.INT64_MAX)
    except parse.Garbled as exc:
        log.warning("a time series bucket in memcache is garbled (%s): skipped", exc)
        return 0

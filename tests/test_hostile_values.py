"""Garbage written straight into memcache: every value we read is parsed strictly, and
each kind of key has its documented outcome (docs/security.md).

The parser (core/parse.py) is fuzzed with hypothesis; every other test writes garbage
with a pymemcache client of its own into the session's real memcached, at the very
key the library reads, and checks what the library then does. Tests that involve
Datastore run on both engines.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cachekit import raw_client
from faultkit import connected
from hypothesis import given
from hypothesis import strategies as st

from sharded_counter import (
    CacheUnavailable,
    Counter,
    IncrementNotRecorded,
    Locked,
    RateLimiter,
    SharedBuffer,
    TimeSeries,
    lock,
)
from sharded_counter.cache import pending_names as pending_names_module
from sharded_counter.cache import records as records_module
from sharded_counter.cache.client import key_digest
from sharded_counter.core import parse
from sharded_counter.core import stash as stash_module
from sharded_counter.core.keys import lease_key
from sharded_counter.core.record import Record, ShardState
from sharded_counter.core.stash import Stash
from sharded_counter.patterns.lock import UNREADABLE, lock_key, who_holds
from sharded_counter.patterns.ratelimit import Strategy, check_key
from sharded_counter_emulator import Memcached, RedisServer, free_port

INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

#: Integers Python's int() takes but we never write.
LENIENT_INTEGERS = ["1_000", " 1", "1 ", "+1", "\u0661", "01", "-0", "1e3", "0x10", "", "-", "1\n"]


@pytest.fixture
def raw(sharded_counter_cache: Memcached | RedisServer) -> Iterator[Any]:
    """The test's own plain client: what anyone with access to the cache can do."""
    client = raw_client(sharded_counter_cache)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def fresh_logs() -> None:
    # Each garbled value is logged once per process: let every test hear its own.
    stash_module._report_garbled.cache_clear()
    records_module._report_garbled.cache_clear()
    pending_names_module._report_poisoned.cache_clear()


# -- the strict parser ----------------------------------------------------------------


@given(st.integers(min_value=-(2**63), max_value=INT64_MAX))
def test_every_int64_we_write_reads_back(n: int) -> None:
    assert parse.integer(str(n)) == n


@given(st.text(max_size=30))
def test_an_integer_is_read_only_in_the_form_str_writes(text: str) -> None:
    try:
        number = parse.integer(text)
    except parse.Garbled:
        return
    assert str(number) == text


@pytest.mark.parametrize("text", [*LENIENT_INTEGERS, str(2**63), str(-(2**63) - 1), "9" * 21])
def test_lenient_or_out_of_range_integers_are_garbled(text: str) -> None:
    with pytest.raises(parse.Garbled):
        parse.integer(text)


@given(st.integers(min_value=0, max_value=UINT64_MAX), st.integers(0, 3))
def test_memcached_counters_read_back_with_their_padding(n: int, spaces: int) -> None:
    assert parse.counter(str(n).encode() + b" " * spaces) == n


@pytest.mark.parametrize("raw", [b"inf", b"nan", b"1_000", b" 1", b"+1", "\u0661".encode(), b""])
def test_a_counter_that_memcached_would_not_write_is_garbled(raw: bytes) -> None:
    with pytest.raises(parse.Garbled):
        parse.counter(raw)
    with pytest.raises(parse.Garbled):
        parse.counter(str(UINT64_MAX).encode(), hi=INT64_MAX)


@given(st.floats(min_value=0, max_value=parse.MAX_DEADLINE, allow_nan=False))
def test_every_deadline_we_write_reads_back_to_the_millisecond(t: float) -> None:
    assert abs(parse.deadline(f"{t:.3f}") - t) <= 0.0005 + t * 1e-15


@pytest.mark.parametrize(
    "text", ["inf", "nan", "-1.0", "1_000.0", " 1.0", "1e3", "\u0661.0", "99999999999999.0", ""]
)
def test_deadlines_that_are_not_finite_times_are_garbled(text: str) -> None:
    with pytest.raises(parse.Garbled):
        parse.deadline(text)


def test_an_over_long_value_is_garbled_before_it_is_read() -> None:
    with pytest.raises(parse.Garbled, match="more than"):
        parse.text(b"1" * 101, limit=100)
    with pytest.raises(parse.Garbled):
        Record.parse(b"r1|abcdefabcdef|c|" + b"x" * 2_000_000)


def test_a_log_line_shows_a_garbled_value_short_and_on_one_line() -> None:
    shown = parse.describe(b"evil\nERROR forged log line" + b"x" * 500)
    assert "\n" not in shown and shown.endswith("(526 bytes)") and len(shown) < 120


shard_states = st.lists(
    st.builds(
        ShardState,
        st.one_of(
            st.integers(0, 9_999).map(lambda i: f"i{i}"),
            st.binary(min_size=6, max_size=6).map(lambda b: "k" + b.hex()),
        ),
        st.integers(0, INT64_MAX),
        st.integers(-(2**63), INT64_MAX),
    ),
    max_size=30,
)


@given(shard_states, st.booleans())
def test_every_record_we_write_reads_back(states: list[ShardState], complete: bool) -> None:
    record = Record.new(states).merged([], complete=complete)
    assert Record.parse(record.encode()) == record


def test_the_stash_of_the_protocol_page_reads_strictly() -> None:
    documented = (
        b"17;f692e1f3a9c41b2d7=1000@1796157600.250;u692e1f40e3d07a11=7/3;"
        b"s692e1f41aa55c0de=0@1796157604.000"
    )
    stash = Stash.parse(documented)
    assert (stash.pending, stash.unsure["692e1f40e3d07a11"].shard) == (17, 3)
    assert stash.encode() == documented
    entries = "".join(f";u{i:016x}=7/3" for i in range(30_000))  # 660,000 bytes
    with pytest.raises(parse.Garbled, match="more than"):
        Stash.parse(f"0{entries}".encode())


# -- the cached record: discarded, and read again from Datastore ----------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"r1|abcdefabcdef|c|i0=9:inf",
        b"r1|abcdefabcdef|c|i0=9:1_000",
        b"r1|abcdefabcdef|c|i0=9:1000,i0=10:1000",  # a shard twice
        b"r1|abcdefabcdef|c|i10000=9:1000",  # beyond any counter's shards
        b"r1|abcdefabcdef|c|i0=9:" + str(2**63).encode(),
        "r1|abcdefabcdef|c|i0=9:\u0661\u0660\u0660\u0660".encode(),
        b"\xff" * 64,
    ],
)
def test_a_garbled_record_is_read_again_from_datastore(
    sharded_counter_env: dict[str, str],
    raw: Any,
    garbage: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    counter = Counter(f"record {uuid.uuid4()}")
    counter.increment(5)
    assert counter.count == 5  # cached now
    raw.set(counter._record_key, garbage)

    with caplog.at_level(logging.WARNING, logger="sharded_counter"):
        assert counter.count == 5
    assert "cached counter record in memcache is garbled" in caplog.text
    refilled = Record.decode(raw.get(counter._record_key))
    assert refilled is not None and refilled.complete and refilled.total == 5
    counter.increment(2)  # a writer's merge into the refilled record
    assert counter.count == counter.get_count(nocache=True) == 7


def test_a_well_formed_forged_record_is_served_and_verify_finds_it(
    sharded_counter_env: dict[str, str], raw: Any
) -> None:
    """What we cannot defend (docs/security.md): a forged record of the right form."""
    counter = Counter(f"forged {uuid.uuid4()}")
    counter.increment(5)
    assert counter.count == 5
    record = Record.decode(raw.get(counter._record_key))
    assert record is not None
    forged = Record(
        record.epoch, True, {sid: (v + 1, 1_000) for sid, (v, _) in record.shards.items()}
    )
    raw.set(counter._record_key, forged.encode())
    assert counter.count == 1_000
    assert counter.get_count(nocache=True) == 5
    counter.repair()
    assert counter.count == 5


# -- the stash: garbage counts nothing, is logged, and the next change replaces it ----


@pytest.mark.parametrize(
    "garbage",
    [
        b"inf",
        b"nan",
        b"1_000",
        b" 1000",
        b"+1000",
        "\u0661\u0660\u0660\u0660".encode(),
        str(UINT64_MAX).encode(),
        b"1000;x",  # a mark we never write
        b"0;uaaaaaaaaaaaaaaaa=1000/99999",  # a shard beyond any counter's
        b"0;faaaaaaaaaaaaaaaa=1000@inf",
        b"0;uaaaaaaaaaaaaaaaa=1000/1;uaaaaaaaaaaaaaaaa=1000/2",  # one token twice
    ],
)
def test_a_garbled_stash_counts_nothing_and_the_next_change_replaces_it(
    sharded_counter_env: dict[str, str],
    raw: Any,
    garbage: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    counter = Counter(f"stash {uuid.uuid4()}")
    counter.increment(5)
    raw.set(counter._stash_key, garbage)

    with caplog.at_level(logging.ERROR, logger="sharded_counter"):
        assert counter.count == 5
        assert counter.get_count(nocache=True) == 5
    assert "delayed_incr stash in memcache is garbled" in caplog.text
    assert counter._pending_stash() == 0

    buffer = SharedBuffer(interval=60)  # its increment is a change of the stash
    buffer.increment(counter.name, 3)
    assert Stash.decode(raw.get(counter._stash_key)).pending == 3
    buffer.flush(counter.name)
    assert counter.get_count(nocache=True) == 8


def test_a_failed_write_that_would_take_the_stash_past_int64_is_not_recorded(
    sharded_counter_env: dict[str, str], raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its stash would read back as garbled, so it is refused: never written, never lost."""
    name = f"edge {uuid.uuid4()}"
    healthy = Counter(name)
    healthy.increment(1)
    with monkeypatch.context() as patch:
        # Nothing listens there: every write is refused for sure.
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter(name, retry_attempts=1, retry_deadline=0.3, rpc_timeout=0.3))
    raw.set(healthy._stash_key, str(INT64_MAX - 1).encode())

    broken.increment(1)  # stashed: pending reaches INT64_MAX exactly
    assert Stash.decode(raw.get(healthy._stash_key)).pending == INT64_MAX
    with pytest.raises(IncrementNotRecorded):
        broken.increment(1)
    assert Stash.decode(raw.get(healthy._stash_key)).pending == INT64_MAX


# -- a shared buffer's pending names: the poisoned one dropped, the rest flushed -------


def test_a_poisoned_pending_name_is_dropped_and_the_rest_are_flushed(
    sharded_counter_env: dict[str, str], raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    names = [f"pending {uuid.uuid4()}" for _ in range(3)]
    buffer = SharedBuffer(interval=60)
    for name in names:
        buffer.increment(name, 2)
    too_long = base64.urlsafe_b64encode(b"y" * 1501)
    poison = [b"!!!", b"YQ", b"_w==", too_long, b"=" * 8, "\u0661".encode()]
    for key in buffer._names.keys:  # every bucket, listed or not
        raw.add(key, b"")
        assert raw.append(key, b"".join(p + b"\n" for p in poison))

    with caplog.at_level(logging.WARNING, logger="sharded_counter"):
        flushed = buffer.flush()
    assert sorted(flushed) == sorted(names)
    assert caplog.text.count("dropped, the other names are flushed") == len(poison)
    for name in names:
        assert Counter(name).get_count(nocache=True) == 2
    assert buffer._names.peek() == set()


# -- rate limits: over the limit, never allowed -----------------------------------------

LIMIT = 5
RATE_GARBAGE = [
    b"lots",
    b"1_000",
    b"-1",
    str(UINT64_MAX).encode(),  # incr would wrap it to a small count
    str(UINT64_MAX - 2).encode(),
    str(2**63).encode(),  # above any count hits could reach
]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def window_key(limiter: RateLimiter, key: str, windows_back: int = 0) -> str:
    index = int(limiter._clock() // limiter.rate.window) - windows_back
    return limiter._key(check_key(key), index)


@pytest.mark.parametrize("strategy", ["fixed", "sliding"])
@pytest.mark.parametrize("on_outage", ["open", "closed", "raise"])
@pytest.mark.parametrize("garbage", RATE_GARBAGE)
def test_a_garbled_window_is_the_whole_limit_spent(
    sharded_counter_cache: Memcached | RedisServer,
    raw: Any,
    strategy: Strategy,
    on_outage: str,
    garbage: bytes,
) -> None:
    clock = FakeClock(time.time() // 60 * 60 + 20)
    limiter = RateLimiter(
        f"{LIMIT}/minute",
        strategy=strategy,
        on_outage=on_outage,  # type: ignore[arg-type]
        cache_url=sharded_counter_cache.url,
        clock=clock,
    )
    key = f"user {uuid.uuid4()}"
    raw.set(window_key(limiter, key), garbage, expire=120)

    assert not limiter.test(key).allowed
    decisions = [limiter.hit(key) for _ in range(LIMIT + 2)]
    assert [d.allowed for d in decisions] == [False] * (LIMIT + 2)
    assert all(d.remaining == 0 for d in decisions)
    clock.now += 60 if strategy == "fixed" else 120  # a new window is clean again
    assert limiter.hit(key).allowed


@pytest.mark.parametrize("garbage", RATE_GARBAGE)
def test_a_garbled_previous_window_refuses_a_sliding_limit(
    sharded_counter_cache: Memcached | RedisServer, raw: Any, garbage: bytes
) -> None:
    clock = FakeClock(time.time() // 60 * 60 + 6)  # the previous window still weighs 90 %
    limiter = RateLimiter(
        f"{LIMIT}/minute",
        strategy="sliding",
        cache_url=sharded_counter_cache.url,
        clock=clock,
    )
    key = f"user {uuid.uuid4()}"
    raw.set(window_key(limiter, key, windows_back=1), garbage, expire=120)
    assert not limiter.test(key).allowed
    assert not limiter.hit(key).allowed
    assert int(raw.get(window_key(limiter, key))) == 0  # the refused hit gave its cost back


class GarbageBeforeDecr:
    """A real client that writes garbage at a key just before each ``decr`` of it: the
    race of a hostile write between a refused hit's ``incr`` and its refund, which no
    real process could time every run (so this wrapper makes it, on the real server)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)

    def decr(self, key: str, value: int, noreply: bool | None = None) -> object:
        self._client.set(key, b"garbage")
        return self._client.decr(key, value, noreply)


def test_garbage_written_before_a_refund_is_still_refused(
    sharded_counter_cache: Memcached | RedisServer, raw: Any
) -> None:
    limiter = RateLimiter(
        "2/minute",
        memcache_client=GarbageBeforeDecr(raw),  # type: ignore[arg-type]
        clock=FakeClock(time.time() // 60 * 60 + 20),
    )
    key = f"user {uuid.uuid4()}"
    assert [limiter.hit(key).allowed for _ in range(5)] == [True, True, False, False, False]


@pytest.mark.parametrize("garbage", [b"lots", str(UINT64_MAX).encode()])
def test_an_async_rate_limiter_refuses_on_a_garbled_window(
    sharded_counter_cache: Memcached | RedisServer, raw: Any, garbage: bytes
) -> None:
    from sharded_counter.aio import AsyncRateLimiter, aclose

    clock = FakeClock(time.time() // 60 * 60 + 20)
    url = sharded_counter_cache.url
    limiter = AsyncRateLimiter(f"{LIMIT}/minute", cache_url=url, clock=clock)
    key = f"user {uuid.uuid4()}"
    raw.set(window_key(limiter, key), garbage, expire=120)

    async def main() -> list[bool]:
        try:
            return [(await limiter.hit(key)).allowed for _ in range(LIMIT + 2)]
        finally:
            await aclose()

    assert asyncio.run(main()) == [False] * (LIMIT + 2)


# -- time series: a garbled bucket skipped, the rest summed and rolled up --------------


@pytest.mark.parametrize("garbage", [b"lots", b"1_000", str(UINT64_MAX).encode(), b"-5"])
def test_a_garbled_bucket_is_skipped_and_the_rest_rolled_up(
    sharded_counter_env: dict[str, str],
    raw: Any,
    garbage: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(time.time() // 60 * 60)
    now = clock.now
    series = TimeSeries(f"hostile {uuid.uuid4()}", [(60, 3600)], durable=True, clock=clock)
    series.incr("/home", 4, at=now - 300)
    series.incr("/home", 3, at=now - 180)
    poisoned = series._key(series._resolution(60), int(now - 240), series._digest("/home"))
    raw.set(poisoned, garbage, expire=3600)

    with caplog.at_level(logging.WARNING, logger="sharded_counter"):
        assert series.sum("/home", now - 600, now) == 7
        assert series.rollup("/home") == 7
    assert "time series bucket in memcache is garbled" in caplog.text
    assert series.sum("/home", now - 600, now) == 7  # now from Datastore
    assert raw.get(poisoned) == garbage  # left alone: never rolled up
    if not garbage.isdigit():  # memcached will not add to it: the caller hears so
        with pytest.raises(CacheUnavailable, match="non-numeric"):
            series.incr("/home", 1, at=now - 240)


# -- locks: garbage is held, never taken over, until memcached expires it -------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"lk1 0123456789abcdef0123456789abcdef inf nan someone",
        b"lk1 0123456789abcdef0123456789abcdef 1_000.000 2_000.000 someone",
        b"lk1 \xff 1.000 2.000 someone",
        b"lk1",
        b"\x00" * 16,
        b"lk1 released ",  # almost a tombstone
    ],
)
def test_a_garbled_lock_is_held_until_memcached_expires_it(
    sharded_counter_cache: Memcached | RedisServer, raw: Any, garbage: bytes
) -> None:
    url = sharded_counter_cache.url
    name = f"lock {uuid.uuid4()}"
    raw.set(lock_key("sc", name), garbage, expire=2)

    with pytest.raises(Locked) as refused:
        lock(name, cache_url=url).acquire()
    assert refused.value.holder is not None and refused.value.holder.owner == UNREADABLE
    holder = who_holds(name, cache_url=url)
    assert holder is not None and holder.owner == UNREADABLE
    # memcached drops it within its 2 s (whole-second clock); waiting takes it then.
    taken = lock(name, ttl=5, nowait=False, timeout=10, cache_url=url).acquire()
    assert taken.expires_at is not None
    assert taken.release()


def test_a_garbled_async_lock_is_held_too(
    sharded_counter_cache: Memcached | RedisServer, raw: Any
) -> None:
    from sharded_counter.aio import aclose, alock

    url = sharded_counter_cache.url
    name = f"lock {uuid.uuid4()}"
    raw.set(lock_key("sc", name), b"lk1 x inf nan someone", expire=60)

    async def main() -> str:
        try:
            with pytest.raises(Locked) as refused:
                await alock(name, cache_url=url).acquire()
            assert refused.value.holder is not None
            return refused.value.holder.owner
        finally:
            await aclose()

    assert asyncio.run(main()) == UNREADABLE


def test_a_garbled_flush_lock_holds_off_its_counter_only(
    sharded_counter_env: dict[str, str], raw: Any
) -> None:
    """A shared buffer's flush takes a lock per counter: garbage there is a lock held."""
    held, free = f"held {uuid.uuid4()}", f"free {uuid.uuid4()}"
    buffer = SharedBuffer(interval=60)
    buffer.increment(held, 4)
    buffer.increment(free, 5)
    flush_lock = f"sc:lock:{key_digest('flush', buffer._scope, held)}"  # lock.internal_lock
    raw.set(flush_lock, b"\xff" * 8, expire=60)

    assert buffer.flush() == [free]
    assert Counter(free).get_count(nocache=True) == 5
    waiting = Counter(held)
    assert Stash.decode(raw.get(waiting._stash_key)).pending == 4  # not written: still pending,
    assert waiting.get_count(nocache=True) == 4  # and counted by reads


# -- shard leases: garbage is a lease held, a hint only -------------------------------


def test_garbage_at_every_shard_lease_leaves_the_count_exact(
    sharded_counter_env: dict[str, str], raw: Any
) -> None:
    counter = Counter(f"leases {uuid.uuid4()}", shards=3, max_shards=3, write_mode="transaction")
    for index in range(3):
        raw.set(lease_key(counter._record_key, index), b"\xffgarbage", expire=60)
    for _ in range(20):
        counter.increment()
    assert counter.get_count(nocache=True) == counter.count == 20

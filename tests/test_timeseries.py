"""TimeSeries on a real memcached: bucketing, range sums, series, retention, rollup.

Time is injected where a test needs exact bucket edges (the clock is the test's;
memcached is real). Inputs that are parsed (times on the command line) are fuzzed.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharded_counter import CacheUnavailable, TimeSeries
from sharded_counter.cache.client import build_client
from sharded_counter.settings import Settings
from sharded_counter.tools.cli import main, parse_when
from sharded_counter_emulator import Memcached, RedisServer, free_port

NOW = 1_700_000_040.0  # on a minute edge
MINUTE_AGO_10 = NOW - 600


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingClient:
    """A real pooled client that counts the calls made through it (a spy, not a mock)."""

    def __init__(self, server: Memcached | RedisServer) -> None:
        self._client = build_client(Settings(cache_url=server.url))
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            keys = args[0] if args and isinstance(args[0], list) else [args[0]] if args else []
            self.calls.append((name, len(keys)))
            return method(*args, **kwargs)

        return counted


def series(server: Memcached, clock: FakeClock | None = None, **options: Any) -> TimeSeries:
    options.setdefault("resolutions", [(10, 3600), (60, 86400)])
    return TimeSeries(
        f"hits {uuid.uuid4()}",
        cache_url=server.url,
        clock=clock or FakeClock(NOW),
        **options,
    )


# -- checking what comes in ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolutions", "error", "mentions"),
    [
        ([(10, 3600), (15, 86400)], ValueError, "multiple"),
        ([(10, 3600), (10, 7200)], ValueError, "distinct"),
        ([(60, 30)], ValueError, "at least one bucket"),
        ([(60, 31 * 86400)], ValueError, "30 days"),
        ([(0, 60)], ValueError, "1 s or more"),
        ([], ValueError, "at least one resolution"),
        ([(10.0, 60)], TypeError, "ints"),
        ([(True, 60)], TypeError, "ints"),
        ([(10, 60, 1)], ValueError, "(bucket seconds, retention seconds)"),
    ],
)
def test_resolutions_are_checked(
    sharded_counter_cache: Memcached | RedisServer,
    resolutions: Any,
    error: type[Exception],
    mentions: str,
) -> None:
    with pytest.raises(error) as caught:
        TimeSeries("x", resolutions, cache_url=sharded_counter_cache.url)
    assert mentions in str(caught.value)


def test_resolutions_are_sorted_finest_first(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    ts = series(sharded_counter_cache, resolutions=[(3600, 86400), (10, 600), (60, 7200)])
    assert [r.seconds for r in ts.resolutions] == [10, 60, 3600]


def test_increments_only_go_up(sharded_counter_cache: Memcached | RedisServer) -> None:
    ts = series(sharded_counter_cache)
    with pytest.raises(ValueError, match="only counts up"):
        ts.incr("k", -1)
    with pytest.raises(TypeError):
        ts.incr("k", True)
    with pytest.raises(TypeError):
        ts.incr("k", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone-aware"):
        ts.incr("k", at=dt.datetime(2024, 1, 1))  # naive: the point of the test
    with pytest.raises(TypeError):
        ts.incr(b"k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ends .* before it starts"):
        ts.sum("k", NOW, NOW - 1)
    ts.incr("k", 0)
    assert ts.sum("k", NOW - 60, NOW) == 0
    with pytest.raises(ValueError, match="name_prefix"):
        TimeSeries("", cache_url=sharded_counter_cache.url)


# -- which buckets a range reads -----------------------------------------------------------------


def test_a_sum_reads_the_coarsest_buckets_that_fit(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    ts = series(sharded_counter_cache)
    m = MINUTE_AGO_10  # a minute edge
    expected = [
        (10, m + 30),
        (10, m + 40),
        (10, m + 50),
        (60, m + 60),
        (60, m + 120),
        (60, m + 180),
        (10, m + 240),
        (10, m + 250),
    ]
    assert ts.plan(m + 30, m + 260) == expected
    # Ends inside a bucket widen to its edges: a bucket that overlaps counts.
    assert ts.plan(m + 33.5, m + 255.2) == expected
    assert ts.plan(m, m) == []


def test_old_ranges_must_align_to_what_is_kept(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    ts = series(sharded_counter_cache)  # 10 s buckets for an hour, 60 s for a day
    two_hours_ago = NOW - 7200  # a minute edge
    with pytest.raises(ValueError, match="align the range's ends there to 60 s"):
        ts.plan(two_hours_ago + 30, NOW)
    plan = ts.plan(two_hours_ago, NOW)
    assert {seconds for seconds, _ in plan} == {60}
    assert len(plan) == 120
    with pytest.raises(ValueError, match="no resolution keeps buckets as old as"):
        ts.plan(NOW - 3 * 86400, NOW)


@given(
    events=st.lists(st.tuples(st.integers(0, 2999), st.integers(1, 5)), max_size=40),
    bounds=st.tuples(st.floats(0, 3000), st.floats(0, 3000)).map(sorted),
)
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_sum_counts_every_event_in_the_buckets_it_covers(
    sharded_counter_cache: Memcached | RedisServer,
    events: list[tuple[int, int]],
    bounds: list[float],
) -> None:
    ts = series(sharded_counter_cache)
    base = NOW - 3000
    for offset, n in events:
        ts.incr("page", n, at=base + offset)
    lo, hi = base + bounds[0], base + bounds[1]
    # Every event whose 10-second bucket overlaps [lo, hi).
    first, last = (lo // 10) * 10, -(-hi // 10) * 10
    expected = sum(n for offset, n in events if first <= ((base + offset) // 10) * 10 < last)
    assert ts.sum("page", lo, hi) == (expected if lo < hi else 0)
    per_minute = ts.series("page", base, NOW, 60)
    assert sum(count for _, count in per_minute) == sum(n for _, n in events)
    for start, count in per_minute:
        assert count == sum(n for o, n in events if start <= base + o < start + 60)


def test_a_query_is_one_round_trip(sharded_counter_cache: Memcached | RedisServer) -> None:
    spy = CountingClient(sharded_counter_cache)
    ts = TimeSeries("spied", memcache_client=spy, clock=FakeClock(NOW))  # type: ignore[arg-type]
    for i in range(30):
        ts.incr("k", at=NOW - 60 * i - 1)
    spy.calls.clear()
    plan = ts.plan(NOW - 7200, NOW)
    assert ts.sum("k", NOW - 7200, NOW) == 30
    assert spy.calls == [("get_many", len(plan))]
    spy.calls.clear()
    assert len(ts.series("k", NOW - 1800, NOW, 10)) == 180
    assert spy.calls == [("get_many", 180)]


def test_a_series_lists_every_bucket_with_zeros(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    ts = series(sharded_counter_cache)
    ts.incr("k", 3, at=NOW - 125)
    ts.incr("k", at=dt.datetime.fromtimestamp(NOW - 10, dt.timezone.utc))
    assert ts.series("k", NOW - 180, NOW, 60) == [(NOW - 180, 3), (NOW - 120, 0), (NOW - 60, 1)]
    assert ts.series("k", NOW - 130, NOW - 110, 10) == [(NOW - 130, 3), (NOW - 120, 0)]
    assert ts.series("k", NOW, NOW, 60) == []
    with pytest.raises(ValueError, match=r"not one of this series' \(10, 60\)"):
        ts.series("k", NOW - 60, NOW, 30)
    with pytest.raises(ValueError, match="kept 3600 s"):
        ts.series("k", NOW - 7200, NOW, 10)


def test_keys_and_series_never_share_buckets(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    a = TimeSeries("a\x00b", cache_url=sharded_counter_cache.url, clock=FakeClock(NOW))
    b = TimeSeries("a", cache_url=sharded_counter_cache.url, clock=FakeClock(NOW))
    a.incr("c", 5, at=NOW - 1)
    assert b.sum("b\x00c", NOW - 10, NOW) == 0
    assert a.sum("c", NOW - 10, NOW) == 5
    assert a.sum("c ", NOW - 10, NOW) == 0


# -- the cache's own clock -----------------------------------------------------------------------


def test_buckets_expire_after_their_retention(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    name = f"short {uuid.uuid4()}"
    short = TimeSeries(name, [(1, 2)], cache_url=sharded_counter_cache.url)
    long = TimeSeries(name, [(1, 3600)], cache_url=sharded_counter_cache.url)
    at = float(int(time.time()))  # a bucket edge
    short.incr("k", 7, at=at)
    short.incr("k", 1, at=at - 10)  # already past retention: not written at all
    assert long.series("k", at - 10, at - 9, 1) == [(at - 10, 0)]
    assert long.sum("k", at, at + 0.5) == 7
    time.sleep(4.1)  # the bucket's second plus two seconds of retention, and memcached's tick
    assert long.sum("k", at, at + 0.5) == 0
    with pytest.raises(ValueError, match="kept 2 s"):
        short.series("k", at, at + 1, 1)


def test_memcache_down_raises_cache_unavailable() -> None:
    ts = TimeSeries("down", memcached_hosts=[f"127.0.0.1:{free_port()}"])
    with pytest.raises(CacheUnavailable):
        ts.incr("k")
    with pytest.raises(CacheUnavailable):
        ts.sum("k", time.time() - 60, time.time())


# -- rollup into durable Counters ------------------------------------------------------


def test_rollup_moves_complete_buckets_into_counters_that_survive_a_flush(
    sharded_counter_env: dict[str, str], sharded_counter_cache: Memcached | RedisServer
) -> None:
    clock = FakeClock(time.time() // 60 * 60)
    now = clock.now
    ts = TimeSeries("durable hits", durable=True, clock=clock)
    for minutes_ago, n in ((5, 2), (5, 3), (3, 4), (0, 1)):
        ts.incr("/home", n, at=now - 60 * minutes_ago + 5)
    assert ts.sum("/home", now - 600, now + 60) == 10

    moved = ts.rollup("/home")
    assert moved == 2 * 9  # both resolutions; the bucket still running stays put
    assert ts.rollup("/home") == 0  # nothing moves twice
    assert ts._bucket_counter("/home", ts.resolutions[1], int(now - 300)).count == 5

    sharded_counter_cache.flush_all()  # the cache is lost...
    assert ts.sum("/home", now - 600, now) == 9  # ...the history is not
    assert ts.series("/home", now - 300, now - 120, 60) == [
        (now - 300, 5),
        (now - 240, 0),
        (now - 180, 4),
    ]
    ts.incr("/home", 6, at=now - 300)  # a late event for a rolled-up bucket
    assert ts.series("/home", now - 300, now - 240, 60) == [(now - 300, 11)]
    assert ts.rollup("/home") == 2 * 6
    assert ts.sum("/home", now - 600, now) == 15


def test_rollup_needs_a_durable_series(sharded_counter_cache: Memcached | RedisServer) -> None:
    with pytest.raises(ValueError, match="durable=True"):
        series(sharded_counter_cache).rollup("k")


# -- the command line ---------------------------------------------------------------------------


def test_the_series_command_shows_buckets_and_their_total(
    sharded_counter_cache: Memcached | RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", sharded_counter_cache.url)
    monkeypatch.setenv("COLUMNS", "200")
    name = f"cli {uuid.uuid4()}"
    now = time.time() // 60 * 60
    ts = TimeSeries(name)
    ts.incr("/home", 4, at=now - 150)
    ts.incr("/home", 2, at=now - 30)
    start = dt.datetime.fromtimestamp(now - 180, dt.timezone.utc).isoformat()
    args = ["series", "/home", "--series", name, "--start", start, "--end", str(now)]
    result = CliRunner().invoke(main, [*args, "--resolution", "60"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    stamp = dt.datetime.fromtimestamp(now - 180, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    assert any(stamp in line and line.rstrip(" │|").endswith("4") for line in lines), lines
    assert any("total" in line and "6" in line for line in lines)
    relative = CliRunner().invoke(
        main, ["series", "/home", "--series", name, "--start", "-5m", "--resolution", "60"]
    )
    assert relative.exit_code == 0 and "total" in relative.output


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--start", "yesterday"], "is not a time"),
        (["--start", "now", "--end", "-1h"], "before it starts"),
        (["--resolution", "0"], "--resolution"),
        (["--start", "-99999999d"], "outside"),
    ],
)
def test_the_series_command_refuses_bad_input_in_one_line(
    sharded_counter_cache: Memcached | RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    mentions: str,
) -> None:
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", sharded_counter_cache.url)
    base = ["series", "k", "--series", "s"]
    if "--resolution" not in args:
        base += ["--resolution", "60"]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert mentions in result.output


# -- reading times on the command line (fuzzed) ----------------------------------------

MOMENTS = st.datetimes(
    min_value=dt.datetime(1970, 1, 2),  # hypothesis takes naive bounds
    max_value=dt.datetime(9999, 12, 30),
    timezones=st.just(dt.timezone.utc),
)


@given(MOMENTS)
def test_iso_times_read_back(moment: dt.datetime) -> None:
    assert parse_when(moment.isoformat(), 0.0) == moment.timestamp()
    naive = moment.replace(tzinfo=None).isoformat()
    assert parse_when(naive, 0.0) == moment.timestamp()  # naive means UTC
    assert parse_when(moment.replace(tzinfo=None).isoformat() + "Z", 0.0) == moment.timestamp()


@given(st.integers(0, 10**11), st.integers(0, 999))
def test_unix_seconds_read_back(seconds: int, millis: int) -> None:
    assert parse_when(str(seconds), 5.0) == seconds
    assert parse_when(f" {seconds}.{millis:03d} ", 5.0) == pytest.approx(seconds + millis / 1000)


@given(
    amount=st.integers(0, 10**4),
    unit=st.sampled_from([("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]),
    sign=st.sampled_from(["-", "+"]),
    prefix=st.sampled_from(["", "now", "NOW", "now "]),
)
def test_relative_times_read_back(
    amount: int, unit: tuple[str, int], sign: str, prefix: str
) -> None:
    now = 1_000_000_000.0
    offset = amount * unit[1]
    expected = now + offset if sign == "+" else now - offset
    assert parse_when(f"{prefix}{sign}{amount}{unit[0]}", now) == expected
    assert parse_when("now", now) == now


@given(st.text(max_size=40))
def test_any_text_is_a_time_or_a_value_error(text: str) -> None:
    try:
        when = parse_when(text, 1_000_000_000.0)
    except ValueError as exc:
        assert str(exc)
    else:
        assert 0 <= when <= 253402300799.0


def test_times_outside_the_calendar_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        parse_when("-999999999d", 0.0)
    with pytest.raises(ValueError, match="outside"):
        parse_when("999999999999", 0.0)

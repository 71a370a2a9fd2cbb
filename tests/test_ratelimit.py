"""RateLimiter and Limit: parsing (fuzzed), and the verdicts on a real memcached.

Concurrency is real too: 16 hitters in 2 processes (spawned) on one key.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import threading
import time
import uuid
from typing import Any, cast

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharded_counter import (
    CacheUnavailable,
    ConfigurationError,
    Decision,
    Limit,
    RateLimited,
    RateLimiter,
)
from sharded_counter.patterns.ratelimit import MAX_WINDOW, Strategy
from sharded_counter.tools.cli import main
from sharded_counter_emulator import Memcached, RedisServer, free_port

UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
}


@pytest.fixture(autouse=True)
def no_memcached_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMCACHED_HOSTS", raising=False)


def fresh_key() -> str:
    return f"user {uuid.uuid4()}"


class FakeClock:
    """Time the test decides; memcached itself is real."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_for_window_start(window: int, need: float) -> None:
    """Sleep until at least ``need`` seconds of the current window remain."""
    left = window - time.time() % window
    if left < need:
        time.sleep(left + 0.01)


# -- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "amount", "window"),
    [
        ("20/minute", 20, 60),
        ("5/second", 5, 1),
        ("100/hour", 100, 3600),
        ("10 per 30 seconds", 10, 30),
        ("5/2 seconds", 5, 2),
        ("  7 / 3 MIN ", 7, 180),
        ("1/day", 1, 86400),
        ("20/60s", 20, 60),
        ("3 per hour", 3, 3600),
    ],
)
def test_limits_parse(text: str, amount: int, window: int) -> None:
    assert Limit.parse(text) == Limit(amount, window)


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("", "looks like"),
        ("twenty/minute", "looks like"),
        ("20", "looks like"),
        ("/minute", "looks like"),
        ("20/", "looks like"),
        ("20/fortnight", "unknown unit 'fortnight'"),
        ("0/minute", "1 to 2**62"),
        ("-1/minute", "looks like"),
        ("20/0 seconds", "at least 1"),
        ("20/8 days", "7 days"),
        ("1.5/minute", "looks like"),
        ("\uff12\uff10/minute", "looks like"),  # full-width digits are not ASCII digits
        ("20/minute please", "looks like"),
        ("20 per", "looks like"),
    ],
)
def test_bad_limits_say_what_is_wrong(text: str, mentions: str) -> None:
    with pytest.raises(ValueError, match=r"rate limit|unit") as caught:
        Limit.parse(text)
    assert mentions in str(caught.value)


def test_limits_must_be_strings() -> None:
    with pytest.raises(TypeError):
        Limit.parse(20)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Limit(True, 60)


@given(amount=st.integers(1, 2**62), window=st.integers(1, MAX_WINDOW))
def test_a_limit_reads_back_from_its_own_text(amount: int, window: int) -> None:
    limit = Limit(amount, window)
    assert Limit.parse(str(limit)) == limit


@given(
    amount=st.integers(1, 10**6),
    count=st.none() | st.integers(1, 59),
    unit=st.sampled_from(sorted(UNITS)),
    per=st.booleans(),
    upper=st.booleans(),
    spaces=st.lists(st.sampled_from(["", " ", "  ", "\t"]), min_size=4, max_size=4),
)
def test_every_spelling_of_the_grammar_parses(
    amount: int, count: int | None, unit: str, per: bool, upper: bool, spaces: list[str]
) -> None:
    separator = " per " if per else f"{spaces[1]}/{spaces[2]}"
    window = (count or 1) * UNITS[unit]
    text = f"{spaces[0]}{amount}{separator}{'' if count is None else count}{spaces[3]}{unit}"
    text = text.upper() if upper else text
    if window > MAX_WINDOW:
        with pytest.raises(ValueError, match="7 days"):
            Limit.parse(text)
    else:
        assert Limit.parse(text) == Limit(amount, window)


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    try:
        limit = Limit.parse(text)
    except ValueError as exc:
        assert "rate limit" in str(exc)
    else:
        assert limit.amount >= 1
        assert 1 <= limit.window <= MAX_WINDOW


# -- verdicts on real memcached ------------------------------------------------------------


def test_a_window_allows_exactly_the_limit_then_rolls_over(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    limiter = RateLimiter("5/2 seconds", cache_url=sharded_counter_cache.url)
    key = fresh_key()
    wait_for_window_start(2, need=1.2)
    first = [limiter.hit(key) for _ in range(8)]
    assert [d.allowed for d in first] == [True] * 5 + [False] * 3
    assert [d.remaining for d in first] == [4, 3, 2, 1, 0, 0, 0, 0]
    window_end = (math.floor(time.time() / 2) + 1) * 2
    assert {d.reset_at for d in first} == {window_end}

    time.sleep(window_end - time.time() + 0.05)  # the next window
    second = [limiter.hit(key) for _ in range(6)]
    assert [d.allowed for d in second] == [True] * 5 + [False]
    assert second[0].reset_at == window_end + 2


def test_test_spends_nothing(sharded_counter_cache: Memcached | RedisServer) -> None:
    limiter = RateLimiter("3/minute", cache_url=sharded_counter_cache.url)
    key = fresh_key()
    wait_for_window_start(60, need=5)
    for _ in range(50):
        assert limiter.test(key) == limiter.test(key)
        assert limiter.test(key).allowed
    assert limiter.test(key).remaining == 3
    limiter.hit(key)
    limiter.hit(key)
    probe = limiter.test(key)
    assert (probe.allowed, probe.remaining) == (True, 1)
    assert not limiter.test(key, cost=2).allowed
    limiter.hit(key)
    assert limiter.test(key) == Decision(False, 0, probe.reset_at)


def test_costs_above_one_and_refused_hits_cost_nothing(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    limiter = RateLimiter("10/minute", cache_url=sharded_counter_cache.url)
    key = fresh_key()
    wait_for_window_start(60, need=5)
    verdicts = [limiter.hit(key, cost) for cost in (4, 4, 4, 2, 1)]
    assert [(d.allowed, d.remaining) for d in verdicts] == [
        (True, 6),
        (True, 2),
        (False, 2),  # 4 more would pass 10: refused, and the 2 left stay left
        (True, 0),
        (False, 0),
    ]
    other = fresh_key()
    too_big = limiter.hit(other, 11)
    assert (too_big.allowed, too_big.remaining) == (False, 10)
    assert limiter.test(other).remaining == 10
    with pytest.raises(ValueError, match="test"):
        limiter.hit(key, 0)
    with pytest.raises(TypeError):
        limiter.hit(key, 1.5)  # type: ignore[arg-type]


def test_the_sliding_window_weighs_the_previous_one(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    clock = FakeClock(1_000_000.0)  # the start of a 10-second window
    limiter = RateLimiter(
        "10 per 10 seconds",
        strategy="sliding",
        cache_url=sharded_counter_cache.url,
        clock=clock,
    )
    key = fresh_key()
    assert all(limiter.hit(key).allowed for _ in range(8))

    clock.now = 1_000_012.5  # a quarter into the next window: 8 * 0.75 = 6 still count
    assert limiter.test(key).remaining == 4
    verdicts = [limiter.hit(key) for _ in range(5)]
    assert [d.allowed for d in verdicts] == [True, True, True, True, False]
    assert [d.remaining for d in verdicts] == [3, 2, 1, 0, 0]
    assert verdicts[0].reset_at == 1_000_030.0  # this window's hits fade out by then

    clock.now = 1_000_017.5  # three quarters in: 8 * 0.25 + 4 = 6
    assert limiter.test(key).remaining == 4
    clock.now = 1_000_022.5  # next window: 4 * 0.75 = 3
    assert limiter.test(key).remaining == 7
    clock.now = 1_000_040.0  # two windows on: nothing left
    assert limiter.test(key).remaining == 10


def test_the_fixed_window_ignores_the_previous_one(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    clock = FakeClock(2_000_000.0)
    limiter = RateLimiter("10/10s", cache_url=sharded_counter_cache.url, clock=clock)
    key = fresh_key()
    assert all(limiter.hit(key).allowed for _ in range(10))
    assert not limiter.hit(key).allowed
    clock.now += 10
    assert limiter.test(key).remaining == 10


@given(key=st.text(max_size=300))
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_key_is_limited_apart(sharded_counter_cache: Memcached | RedisServer, key: str) -> None:
    limiter = RateLimiter("2/minute", cache_url=sharded_counter_cache.url)
    unique = f"{key}\x00{uuid.uuid4()}"
    assert limiter.hit(unique).remaining == 1
    assert limiter.hit(unique + "!").remaining == 1


def test_the_decorator_refuses_over_the_limit(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    limiter = RateLimiter("2/minute", cache_url=sharded_counter_cache.url)
    calls: list[str] = []
    user = fresh_key()

    @limiter.limit(lambda who, *_: who)
    def greet(who: str, punctuation: str = "!") -> str:
        calls.append(who)
        return f"hello {who}{punctuation}"

    wait_for_window_start(60, need=5)
    assert greet(user) == f"hello {user}!"
    assert greet(user, "?") == f"hello {user}?"
    with pytest.raises(RateLimited) as refused:
        greet(user)
    assert refused.value.key == user
    assert not refused.value.decision.allowed
    assert calls == [user, user]  # the refused call did not run
    assert greet.__name__ == "greet"


# -- concurrency: 16 hitters in 2 processes --------------------------------------------------


def hitter_process(
    url: str,
    key: str,
    strategy: str,
    threads: int,
    hits: int,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    limiter = RateLimiter("50/5 seconds", strategy=cast(Strategy, strategy), cache_url=url)
    limiter.test("warm up")  # connect before the start line
    ready.put(os.getpid())
    go.wait()
    outcomes: list[tuple[bool, int]] = []
    lock = threading.Lock()

    def hammer() -> None:
        mine = [(limiter.hit(key).allowed, math.floor(time.time() / 5)) for _ in range(hits)]
        with lock:
            outcomes.extend(mine)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(outcomes)


@pytest.mark.parametrize("strategy", ["fixed", "sliding"])
def test_exactly_the_limit_under_16_hitters_in_2_processes(
    sharded_counter_cache: Memcached | RedisServer, strategy: str
) -> None:
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    key = fresh_key()
    processes = [
        context.Process(
            target=hitter_process,
            args=(sharded_counter_cache.url, key, strategy, 8, 25, ready, go, results),
        )
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready.get(timeout=60)
        # A fresh window with room to spare, and (for sliding) an empty one before it.
        wait_for_window_start(5, need=4.0)
        go.set()
        outcomes = [hit for _ in processes for hit in results.get(timeout=60)]
    finally:
        for process in processes:
            process.join(timeout=30)
    assert [p.exitcode for p in processes] == [0, 0]
    assert len(outcomes) == 2 * 8 * 25
    assert len({window for _, window in outcomes}) == 1, "the burst straddled two windows"
    allowed = sum(allowed for allowed, _ in outcomes)
    print(f"\nrate limit {strategy}: allowed={allowed} of {len(outcomes)} hits, limit 50")
    assert allowed == 50


# -- when memcache is away -------------------------------------------------------------------


def test_fails_open_by_default_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    server = Memcached(port=free_port())
    limiter = RateLimiter("1/minute", cache_url=server.url)  # nothing listens yet
    key = fresh_key()
    with caplog.at_level(logging.WARNING, logger="sharded_counter"):
        verdicts = [limiter.hit(key) for _ in range(5)]
        assert all(d.allowed for d in verdicts)
        assert limiter.test(key).allowed
        server.start()
        try:
            wait_for_window_start(60, need=3)
            assert limiter.hit(key).allowed
            assert not limiter.hit(key).allowed  # counted again once it answers
        finally:
            server.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m and "allowing every hit" in m for m in messages) == 1
    assert sum("answers again" in m for m in messages) == 1


def test_fails_closed_or_raises_when_asked() -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    closed = RateLimiter("100/minute", memcached_hosts=[nowhere], on_outage="closed")
    assert closed.hit("k") == Decision(False, 0, closed.hit("k").reset_at)
    strict = RateLimiter("100/minute", memcached_hosts=[nowhere], on_outage="raise")
    with pytest.raises(CacheUnavailable):
        strict.hit("k")
    with pytest.raises(CacheUnavailable):
        strict.test("k")
    with pytest.raises(ValueError, match="on_outage"):
        RateLimiter("1/minute", memcached_hosts=[nowhere], on_outage="maybe")  # type: ignore[arg-type]


@pytest.mark.memcached_only  # counts memcached's own connections or reads MEMCACHED_HOSTS
def test_needs_memcached_and_checks_its_arguments() -> None:
    with pytest.raises(ConfigurationError, match="MEMCACHED_HOSTS"):
        RateLimiter("1/minute")
    with pytest.raises(ValueError, match="strategy"):
        RateLimiter("1/minute", strategy="leaky", memcached_hosts="h:1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RateLimiter("1/minute", memcached_hosts="h:1").hit(42)  # type: ignore[arg-type]


def test_a_limiter_made_before_fork_uses_the_childs_own_connection(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    limiter = RateLimiter("5/minute", cache_url=sharded_counter_cache.url)
    parent_client = limiter._client()  # the process-wide client, looked up per call
    key = fresh_key()
    wait_for_window_start(60, need=5)
    limiter.hit(key)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = limiter._client() is not parent_client and limiter.hit(key).remaining == 3
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert limiter.test(key).remaining == 3


# -- the command line ---------------------------------------------------------


def test_the_limits_command_shows_without_spending(
    sharded_counter_cache: Memcached | RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", sharded_counter_cache.url)
    monkeypatch.setenv("COLUMNS", "200")
    key = fresh_key()
    wait_for_window_start(60, need=5)
    RateLimiter("20/minute").hit(key, 5)
    for _ in range(3):
        result = CliRunner().invoke(main, ["limits", key, "--limit", "20/minute"])
        assert result.exit_code == 0, result.output
        assert "15" in result.output and "allowed" in result.output
    sliding = CliRunner().invoke(
        main, ["limits", key, "--limit", "20/minute", "--strategy", "sliding"]
    )
    assert sliding.exit_code == 0 and "sliding" in sliding.output
    assert RateLimiter("20/minute").test(key).remaining == 15


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["limits", "k", "--limit", "20/fortnight"], "unknown unit"),
        (["limits", "k", "--limit", "20/minute", "--strategy", "leaky"], "leaky"),
        (["limits", "k"], "--limit"),
    ],
)
def test_the_limits_command_refuses_bad_input_in_one_line(
    sharded_counter_cache: Memcached | RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    mentions: str,
) -> None:
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", sharded_counter_cache.url)
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert mentions in result.output


@pytest.mark.memcached_only  # counts memcached's own connections or reads MEMCACHED_HOSTS
def test_the_limits_command_reports_memcache_down_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMCACHED_HOSTS", f"127.0.0.1:{free_port()}")
    result = CliRunner().invoke(main, ["limits", "k", "--limit", "20/minute"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "error:" in result.output and "Traceback" not in result.output

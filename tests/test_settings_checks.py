"""Every setting and every class's arguments are checked up front, by one rule per kind
of value (core/validation.py): ``TypeError`` for a wrong type, ``ValueError`` for a
bad value (issue 26). A bad *setting* is a ``ConfigurationError`` either way, as
docs/using.md promises; a wrong type is a ``ConfigurationTypeError``, which is a
``TypeError`` too.

The tables name each bad value and the exception it must raise, for every option
and every class. Nothing here reaches a backend: each call raises before any I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from sharded_counter import (
    BoundedCounter,
    ConfigurationError,
    Counter,
    CounterBuffer,
    RateLimiter,
    Settings,
    SharedBuffer,
    TimeSeries,
    config,
    lock,
)
from sharded_counter.core.validation import MAX_MEMCACHED_TTL, MAX_SECONDS
from sharded_counter.errors import ConfigurationTypeError
from sharded_counter.settings import resolve

HOSTS = "127.0.0.1:1"  # never contacted: every call below raises first

SECONDS_OPTIONS = (
    "memcache_timeout",
    "memcache_connect_timeout",
    "retry_deadline",
    "retry_initial_wait",
    "retry_max_wait",
    "rpc_timeout",
)
BAD_SECONDS: list[tuple[Any, type[Exception]]] = [
    ("1", TypeError),
    (None, TypeError),
    (True, TypeError),
    (0, ValueError),
    (-1.5, ValueError),
    (math.nan, ValueError),
    (math.inf, ValueError),
    (1e308, ValueError),  # the case: accepted, then failed later
    (MAX_SECONDS + 1, ValueError),
]

#: (option, bad value, the exception it must raise)
BAD_SETTINGS: list[tuple[str, Any, type[Exception]]] = [
    *[(option, value, error) for option in SECONDS_OPTIONS for value, error in BAD_SECONDS],
    ("shards", "3", TypeError),
    ("shards", 3.0, TypeError),
    ("shards", True, TypeError),
    ("shards", 0, ValueError),
    ("shards", 10_001, ValueError),
    ("max_shards", "20", TypeError),
    ("max_shards", 0, ValueError),
    ("cache_ttl", 60.5, TypeError),
    ("cache_ttl", "60", TypeError),
    ("cache_ttl", 0, ValueError),
    ("cache_ttl", MAX_MEMCACHED_TTL + 1, ValueError),  # memcached: a unix time
    ("idempotency_ttl", 1.5, TypeError),
    ("idempotency_ttl", 0, ValueError),
    ("idempotency_ttl", 10**12, ValueError),  # past what a Datastore timestamp holds
    ("retry_attempts", 2.0, TypeError),
    ("retry_attempts", 0, ValueError),
    ("retry_attempts", 10**6, ValueError),
    ("max_concurrent_writes", None, TypeError),
    ("max_concurrent_writes", 0, ValueError),
    ("max_concurrent_writes", 10**6, ValueError),
    ("group_commit", 1, TypeError),
    ("group_commit", "yes", TypeError),
    ("write_mode", 1, TypeError),
    ("write_mode", "fast", ValueError),
    ("key_prefix", 7, TypeError),
    ("key_prefix", "", ValueError),
    ("key_prefix", "has space", ValueError),
    ("key_prefix", "x" * 65, ValueError),
    ("memcached_hosts", 11211, TypeError),
    ("memcached_hosts", [11211], TypeError),
    ("memcached_hosts", ["localhost"], ValueError),
    ("memcached_hosts", ["localhost:0"], ValueError),
    ("memcached_hosts", ["localhost:65536"], ValueError),
    ("memcached_hosts", ["localhost:١١٢١١"], ValueError),  # Arabic-Indic digits
    ("memcached_hosts", ["localhost:²"], ValueError),  # a digit to isdigit(), not to int()
    ("memcached_hosts", [":11211"], ValueError),
    ("memcached_hosts", ["héte:11211"], ValueError),
    ("project", 5, TypeError),
    ("database", b"db", TypeError),
    ("namespace", ["ns"], TypeError),
]


def bad(value: Any) -> Any:
    """A value of the wrong type, typed Any: passing it is the point of the test."""
    return value


def _ids(row: tuple[Any, ...]) -> str:
    return "-".join(str(part)[:20] for part in row[:2])


def _assert_setting_error(raised: BaseException, error: type[Exception]) -> None:
    assert isinstance(raised, error), f"{type(raised).__name__} is not a {error.__name__}"
    assert isinstance(raised, ConfigurationError)
    assert isinstance(raised, ConfigurationTypeError) == (error is TypeError)


@pytest.mark.parametrize(("option", "value", "error"), BAD_SETTINGS, ids=map(_ids, BAD_SETTINGS))
def test_a_bad_setting_is_refused_from_every_source(
    option: str, value: Any, error: type[Exception]
) -> None:
    """Settings(...) directly, a keyword argument, a class attribute and the global config."""

    class Subclass(Counter):
        pass

    setattr(Subclass, option, value)
    sources: list[Callable[[], object]] = [
        lambda: Settings(**{option: value}),
        lambda: resolve({option: value}),
        lambda: resolve({}, {option: value}),
    ]
    for make in sources:
        with pytest.raises(ConfigurationError) as raised:
            make()
        _assert_setting_error(raised.value, error)
    config["sharded_counter"] = {option: value}
    with pytest.raises(ConfigurationError) as raised:
        resolve()
    _assert_setting_error(raised.value, error)


def test_max_shards_below_shards_is_refused_and_follows_it_when_unset() -> None:
    with pytest.raises(ConfigurationError, match="at least shards"):
        resolve({"shards": 12, "max_shards": 8})
    config["sharded_counter"] = {"max_shards": 8}
    with pytest.raises(ConfigurationError, match="at least shards"):
        resolve({"shards": 12})  # set in another source: still refused
    config.clear()
    assert resolve({"shards": 50}).max_shards == 50  # the docs' Counter('hits', shards=50)
    assert resolve({"shards": 5}).max_shards == 20
    assert resolve({"shards": 5, "max_shards": 5}).max_shards == 5


def test_a_bad_memcached_hosts_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMCACHED_HOSTS", "localhost:11211 localhost:1l211")
    with pytest.raises(ConfigurationError, match="1l211"):
        resolve()


def test_the_largest_good_values_are_taken() -> None:
    edge = Settings(
        memcache_timeout=MAX_SECONDS,
        rpc_timeout=0.001,
        cache_ttl=MAX_MEMCACHED_TTL,
        shards=10_000,
        max_shards=10_000,
        memcached_hosts=("[::1]:65535", "cache-1.internal:1"),
    )
    assert edge.memcache_timeout == MAX_SECONDS and edge.cache_ttl == MAX_MEMCACHED_TTL


# -- every class's arguments ---------------------------------------------------------------

#: (what, the call, the exception it must raise)
BAD_ARGUMENTS: list[tuple[str, Callable[[], object], type[Exception]]] = [
    # RateLimiter (the limit's own parsing is tests/test_ratelimit.py's)
    (
        "RateLimiter strategy=1",
        lambda: RateLimiter("5/minute", strategy=bad(1), memcached_hosts=HOSTS),
        TypeError,
    ),
    (
        "RateLimiter strategy=leaky",
        lambda: RateLimiter("5/minute", strategy=bad("leaky"), memcached_hosts=HOSTS),
        ValueError,
    ),
    (
        "RateLimiter on_outage=None",
        lambda: RateLimiter("5/minute", on_outage=bad(None), memcached_hosts=HOSTS),
        TypeError,
    ),
    (
        "RateLimiter on_outage=maybe",
        lambda: RateLimiter("5/minute", on_outage=bad("maybe"), memcached_hosts=HOSTS),
        ValueError,
    ),
    ("RateLimiter hosts=h:x", lambda: RateLimiter("5/minute", memcached_hosts="h:x"), ValueError),
    (
        "RateLimiter key_prefix=1",
        lambda: RateLimiter("5/minute", memcached_hosts=HOSTS, key_prefix=bad(1)),
        TypeError,
    ),
    # lock
    ("lock name=b'x'", lambda: lock(bad(b"x"), memcached_hosts=HOSTS), TypeError),
    ("lock ttl=1.5", lambda: lock("x", ttl=bad(1.5), memcached_hosts=HOSTS), TypeError),
    ("lock ttl=0", lambda: lock("x", ttl=0, memcached_hosts=HOSTS), ValueError),
    (
        "lock ttl=31 days",
        lambda: lock("x", ttl=MAX_MEMCACHED_TTL + 1, memcached_hosts=HOSTS),
        ValueError,
    ),
    ("lock timeout='1'", lambda: lock("x", timeout=bad("1"), memcached_hosts=HOSTS), TypeError),
    ("lock timeout=-1", lambda: lock("x", timeout=-1, memcached_hosts=HOSTS), ValueError),
    ("lock timeout=nan", lambda: lock("x", timeout=math.nan, memcached_hosts=HOSTS), ValueError),
    ("lock timeout=1e308", lambda: lock("x", timeout=1e308, memcached_hosts=HOSTS), ValueError),
    ("lock hosts=h:0", lambda: lock("x", memcached_hosts="h:0"), ValueError),
    # TimeSeries
    (
        "TimeSeries name_prefix=None",
        lambda: TimeSeries(bad(None), memcached_hosts=HOSTS),
        TypeError,
    ),
    ("TimeSeries name_prefix=''", lambda: TimeSeries("", memcached_hosts=HOSTS), ValueError),
    (
        "TimeSeries resolutions (10.0, 60)",
        lambda: TimeSeries("t", bad([(10.0, 60)]), memcached_hosts=HOSTS),
        TypeError,
    ),
    (
        "TimeSeries retention 31 days",
        lambda: TimeSeries("t", [(60, 31 * 86400)], memcached_hosts=HOSTS),
        ValueError,
    ),
    (
        "TimeSeries durable='yes'",
        lambda: TimeSeries("t", durable=bad("yes"), memcached_hosts=HOSTS),
        TypeError,
    ),
    (
        "TimeSeries counter_options=[]",
        lambda: TimeSeries("t", counter_options=bad([]), memcached_hosts=HOSTS),
        TypeError,
    ),
    (
        "TimeSeries counter_options shards=0",
        lambda: TimeSeries("t", counter_options={"shards": 0}, memcached_hosts=HOSTS),
        ValueError,
    ),
    (
        "TimeSeries counter_options rpc_timeout=inf",
        lambda: TimeSeries("t", counter_options={"rpc_timeout": math.inf}, memcached_hosts=HOSTS),
        ValueError,
    ),
    (
        "TimeSeries counter_options unknown",
        lambda: TimeSeries("t", counter_options={"shardz": 2}, memcached_hosts=HOSTS),
        ValueError,
    ),
]

#: Rows that need the emulator's environment: their constructors make a Datastore client.
BAD_COUNTER_ARGUMENTS: list[tuple[str, Callable[[], object], type[Exception]]] = [
    ("Counter name=None", lambda: Counter(bad(None)), TypeError),
    ("Counter name=''", lambda: Counter(""), ValueError),
    ("Counter name internal", lambda: Counter("\x00sc:ts"), ValueError),
    ("Counter shards='3'", lambda: Counter("c", shards="3"), TypeError),
    ("Counter rpc_timeout=1e308", lambda: Counter("c", rpc_timeout=1e308), ValueError),
    ("Counter shards=30 max_shards=20", lambda: Counter("c", shards=30, max_shards=20), ValueError),
    ("Counter unknown option", lambda: Counter("c", shardz=3), ValueError),
    ("BoundedCounter maximum='3'", lambda: BoundedCounter("b", maximum=bad("3")), TypeError),
    (
        "BoundedCounter minimum>maximum",
        lambda: BoundedCounter("b", minimum=5, maximum=3),
        ValueError,
    ),
    ("BoundedCounter maximum=2**63", lambda: BoundedCounter("b", maximum=2**63), ValueError),
    ("BoundedCounter cache_ttl=0", lambda: BoundedCounter("b", maximum=3, cache_ttl=0), ValueError),
    ("SharedBuffer interval=True", lambda: SharedBuffer(interval=True), TypeError),
    ("SharedBuffer interval=0", lambda: SharedBuffer(interval=0), ValueError),
    ("SharedBuffer interval=1e308", lambda: SharedBuffer(interval=1e308), ValueError),
    ("SharedBuffer on_cache_failure=1", lambda: SharedBuffer(on_cache_failure=bad(1)), TypeError),
    (
        "SharedBuffer on_cache_failure=drop",
        lambda: SharedBuffer(on_cache_failure="drop"),
        ValueError,
    ),
    ("SharedBuffer counter option", lambda: SharedBuffer(retry_deadline=-1), ValueError),
    ("CounterBuffer interval=0", lambda: CounterBuffer(interval=0), ValueError),
    ("CounterBuffer jitter=-1", lambda: CounterBuffer(jitter=-1), ValueError),
    ("CounterBuffer max_keys=0", lambda: CounterBuffer(max_keys=0), ValueError),
    (
        "CounterBuffer counter option",
        lambda: CounterBuffer(cache_ttl=MAX_MEMCACHED_TTL + 1),
        ValueError,
    ),
    ("CounterBuffer counter_class=int", lambda: CounterBuffer(bad(int)), TypeError),
]

#: CounterBuffer's own timing checks, on core/validation's helpers as everywhere else.
BUFFER_CHECKS: list[Any] = [
    ("CounterBuffer interval='5'", lambda: CounterBuffer(interval=bad("5")), TypeError),
    ("CounterBuffer max_attempts=2.0", lambda: CounterBuffer(max_attempts=bad(2.0)), TypeError),
    ("CounterBuffer interval=inf", lambda: CounterBuffer(interval=math.inf), ValueError),
    ("CounterBuffer timeout=1e308", lambda: CounterBuffer(timeout=1e308), ValueError),
]


def _check(call: Callable[[], object], error: type[Exception]) -> None:
    other = ValueError if error is TypeError else TypeError
    with pytest.raises(error) as raised:
        call()
    # Not both: a wrong type must not pass for a bad value, nor the other way round
    # (ConfigurationTypeError is both a ConfigurationError and a TypeError).
    if not isinstance(raised.value, ConfigurationTypeError):
        assert not isinstance(raised.value, other), f"{raised.value!r} is a {other.__name__} too"


@pytest.mark.parametrize(
    ("what", "call", "error"), BAD_ARGUMENTS, ids=[r[0] for r in BAD_ARGUMENTS]
)
def test_a_bad_argument_is_refused_up_front(
    what: str, call: Callable[[], object], error: type[Exception]
) -> None:
    _check(call, error)


@pytest.mark.parametrize(
    ("what", "call", "error"),
    [*BAD_COUNTER_ARGUMENTS, *BUFFER_CHECKS],
    ids=[r[0] for r in [*BAD_COUNTER_ARGUMENTS, *BUFFER_CHECKS]],
)
def test_a_bad_counter_argument_is_refused_up_front(
    sharded_counter_env: dict[str, str],
    what: str,
    call: Callable[[], object],
    error: type[Exception],
) -> None:
    _check(call, error)

"""Exact totals at the edges of the signed 64-bit range, on both engines.

A shard is one Datastore integer (int64); a total is the sum of shards and may go
far beyond it, as an exact Python int. These tests put shards at the edges
(writing shard entities directly where a precise layout matters) and check that
the cached and uncached totals stay exact, and that an increment or ``count = v``
that cannot fit writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from faultkit import connected
from google.cloud import datastore

from sharded_counter import Counter, CounterOverflowError
from sharded_counter.core.keys import SHARD_KIND, shard_key_name
from sharded_counter.core.validation import INT64_MAX, INT64_MIN
from sharded_counter.store.shards import ShardOverflow, ShardStore
from sharded_counter_emulator import datastore_client, free_port

pytestmark = pytest.mark.backends

# The edge cases go through the read-add-write transaction on both engines: it is
# the path that can see a shard's value before adding to it.
TRANSACTION = {"write_mode": "transaction"}


def put_shards(name: str, values: dict[int, int]) -> None:
    """Lay the shards out exactly as given (index -> count), as the library would key them."""
    client = datastore_client()
    entities = []
    for index, value in values.items():
        entity = datastore.Entity(
            client.key(SHARD_KIND, shard_key_name(name, index)), exclude_from_indexes=("count",)
        )
        entity.update({"name": name, "count": value})
        entities.append(entity)
    client.put_multi(entities)


def shard_values(name: str) -> dict[str, int]:
    client = datastore_client()
    query = client.query(kind=SHARD_KIND)
    query.add_filter(filter=datastore.query.PropertyFilter("name", "=", name))
    return {e.key.name: e["count"] for e in query.fetch()}


def assert_totals(counter: Counter, expected: int) -> None:
    cached, uncached = counter.count, counter.get_count(nocache=True)
    assert type(cached) is int and type(uncached) is int
    assert (cached, uncached) == (expected, expected), (
        f"cached={cached} uncached={uncached} expected={expected}"
    )


def spy_on(
    monkeypatch: pytest.MonkeyPatch, method: str, outcome: Callable[[BaseException | None], None]
) -> None:
    """Call ``outcome(error or None)`` after each real ``ShardStore.<method>`` call."""
    real = getattr(ShardStore, method)

    def spied(store: ShardStore, *args: Any, **kwargs: Any) -> Any:
        try:  # the store's calls are steps (core/effects.py): so is this
            result = yield from real(store, *args, **kwargs)
        except BaseException as exc:
            outcome(exc)
            raise
        outcome(None)
        return result

    monkeypatch.setattr(ShardStore, method, spied)


# -- one shard full: the increment goes to another ------------------------------------------


@pytest.mark.parametrize("sign", [1, -1], ids=["up", "down"])
def test_an_increment_a_full_shard_cannot_take_goes_to_another(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, sign: int
) -> None:
    name = f"edge-{sign}"
    edge = INT64_MAX - 3 if sign > 0 else INT64_MIN + 3
    put_shards(name, {0: edge, 1: 0})
    refused: list[BaseException] = []
    spy_on(
        monkeypatch,
        "add_in_transaction",
        lambda exc: refused.append(exc) if isinstance(exc, ShardOverflow) else None,
    )
    counter = Counter(name, shards=2, **TRANSACTION)
    for _ in range(20):  # the first shard tried is random: about half start on the full one
        counter.increment(sign * 10)
    assert refused, "no write ever tried the full shard first: the redirect was not exercised"
    assert shard_values(name) == {
        shard_key_name(name, 0): edge,
        shard_key_name(name, 1): sign * 200,
    }
    assert_totals(counter, edge + sign * 200)  # past the int64 edge, exactly


def test_no_single_shard_has_room_but_all_together_do(sharded_counter_env: dict[str, str]) -> None:
    name = "spread-out"
    put_shards(name, {0: INT64_MAX - 3, 1: INT64_MAX - 3})
    counter = Counter(name, shards=2, **TRANSACTION)
    counter.increment(5)  # 2*MAX - 1 in all: it fits, only spread differently
    values = shard_values(name)
    assert sum(values.values()) == 2 * INT64_MAX - 1
    assert all(INT64_MIN <= v <= INT64_MAX for v in values.values())
    assert_totals(counter, 2 * INT64_MAX - 1)


@pytest.mark.parametrize(
    ("shards", "value", "delta"),
    [
        (1, INT64_MAX, 1),
        (1, INT64_MIN, -1),
        (2, 2 * INT64_MAX, 1),
        (2, 2 * INT64_MAX - 3, 5),  # no shard, and not all of them together, has room for 5
        (3, 3 * INT64_MIN, -(2**40)),
    ],
)
def test_an_increment_no_shard_can_take_writes_nothing(
    sharded_counter_env: dict[str, str], shards: int, value: int, delta: int
) -> None:
    name = "full"
    counter = Counter(name, shards=shards, **TRANSACTION)
    counter.count = value  # the edge itself is a valid total
    before = shard_values(name)
    assert sum(before.values()) == value
    with pytest.raises(CounterOverflowError):
        counter.increment(delta)
    assert shard_values(name) == before  # every shard as it was: nothing written
    assert_totals(counter, value)


@pytest.mark.needs_processes
def test_an_overflowing_increment_puts_back_the_stash_it_took(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stash taken to fold into a write that overflows is stashed again, not lost."""
    name = "full-with-stash"
    counter = Counter(name, shards=1, **TRANSACTION)
    counter.count = INT64_MAX - 10
    with monkeypatch.context() as patch:
        # Nothing listens there: this counter's writes fail and go to delayed_incr.
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter(name, retry_attempts=1, retry_deadline=0.3, rpc_timeout=0.3))
    broken.increment(5)
    assert broken.stats.snapshot()["stashed"] == 1
    assert_totals(counter, INT64_MAX - 5)  # the read also lets this writer see the stash

    with pytest.raises(CounterOverflowError):
        counter.increment(8)  # 5 stashed + 8 would leave the only shard's range
    assert shard_values(name) == {shard_key_name(name, 0): INT64_MAX - 10}
    assert_totals(counter, INT64_MAX - 5)  # the 5 is still pending

    counter.increment(-10)  # takes the 5 along: the shard gets -5
    assert counter.stats.snapshot()["folded"] == 1
    assert shard_values(name) == {shard_key_name(name, 0): INT64_MAX - 15}
    assert_totals(counter, INT64_MAX - 15)


# -- totals beyond int64 ------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1, -1], ids=["up", "down"])
def test_totals_beyond_int64_are_exact_python_ints(
    sharded_counter_env: dict[str, str], sharded_counter_cache: Any, sign: int
) -> None:
    name = f"huge-{sign}"
    counter = Counter(name, shards=3, **TRANSACTION)
    start = 3 * INT64_MAX - 6 if sign > 0 else 3 * INT64_MIN + 6
    counter.count = start
    for _ in range(3):
        counter.increment(sign)
    expected = start + 3 * sign
    assert_totals(counter, expected)
    sharded_counter_cache.flush_all()
    assert_totals(counter, expected)  # rebuilt from the shards, still exact
    assert_totals(Counter(name), expected)  # another object, another shard count: the same
    assert sum(shard_values(name).values()) == expected


# -- the transform path (Firestore in Datastore mode) -------------------------------------------

firestore_only = pytest.mark.parametrize("sharded_counter_engine", ["firestore"], indirect=True)


@firestore_only
@pytest.mark.parametrize("sign", [1, -1], ids=["up", "down"])
def test_a_shard_past_2_62_is_rebalanced(sharded_counter_env: dict[str, str], sign: int) -> None:
    name = f"rebalance-{sign}"
    high = sign * (2**62 - 5)
    put_shards(name, {0: high, 1: 0})
    counter = Counter(name, shards=2)
    assert counter.write_mode == "transform"
    written = 0
    for _ in range(40):  # the shard is random: stop once the high one was pushed over
        counter.increment(sign * 10)
        written += sign * 10
        if counter.stats.snapshot()["rebalances"]:
            break
    assert counter.stats.snapshot()["rebalances"] >= 1
    values = shard_values(name)
    assert all(abs(v) < 2**62 for v in values.values()), values
    assert_totals(counter, high + written)


@firestore_only
def test_deltas_beyond_2_32_take_the_transaction_path(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = Counter("big-deltas", shards=4)
    assert counter.write_mode == "transform"
    paths: list[str] = []
    spy_on(monkeypatch, "add_in_transaction", lambda exc: paths.append("transaction"))
    spy_on(monkeypatch, "add_with_transform", lambda exc: paths.append("transform"))
    deltas = [2**32, 2**32 + 1, -(2**32) - 1, 2**40, -(2**32), 7]
    for delta in deltas:
        counter.increment(delta)
    expected = ["transform", "transaction", "transaction", "transaction", "transform", "transform"]
    assert paths == expected
    assert_totals(counter, sum(deltas))


@firestore_only
@pytest.mark.parametrize("sign", [1, -1], ids=["up", "down"])
def test_transform_increments_near_the_limit_are_exact_or_refused(
    sharded_counter_env: dict[str, str], sign: int
) -> None:
    """Where transforms write, a shard holds at most 2**62 so the server never saturates.

    A one-shard counter set just under the limit and pushed past it: the transform
    result past 2**62 cannot be spread back (one shard), so the process switches to
    transactions, which refuse what would not fit. Every increment is either counted
    whole or refused with nothing written.
    """
    counter = Counter(f"transform-edge-{sign}", shards=1)
    start = sign * (2**62 - 3)
    counter.count = start
    assert counter.write_mode == "transform"
    acknowledged = refused = 0
    for _ in range(4):
        try:
            counter.increment(sign * 5)
        except CounterOverflowError:
            refused += 1
        else:
            acknowledged += sign * 5
    assert refused >= 1
    assert_totals(counter, start + acknowledged)
    assert all(abs(v) < 2**63 - 1 for v in shard_values(counter.name).values())


@firestore_only
def test_setting_past_the_transform_limit_is_refused(sharded_counter_env: dict[str, str]) -> None:
    counter = Counter("transform-wide", shards=3)
    counter.count = 3 * 2**62  # three shards of 2**62 each
    assert_totals(counter, 3 * 2**62)
    with pytest.raises(ValueError):
        counter.count = 3 * 2**62 + 3
    assert_totals(counter, 3 * 2**62)


# -- count = v across several shards ----------------------------------------------------------


def test_setting_beyond_one_shard_spreads_it_exactly(sharded_counter_env: dict[str, str]) -> None:
    counter = Counter("wide", shards=3, **TRANSACTION)
    for value in (2 * INT64_MAX, 3 * INT64_MAX, -2 * INT64_MAX, 3 * INT64_MIN, 2**64 + 1):
        counter.count = value
        values = shard_values("wide")
        assert len(values) == 3 and all(INT64_MIN <= v <= INT64_MAX for v in values.values())
        assert_totals(counter, value)


@pytest.mark.parametrize("value", [3 * INT64_MAX + 1, 3 * INT64_MIN - 1, 10**30])
def test_setting_beyond_all_shards_raises_and_writes_nothing(
    sharded_counter_env: dict[str, str], value: int
) -> None:
    counter = Counter("too-wide", shards=3, **TRANSACTION)
    counter.count = 2 * INT64_MAX
    before = shard_values("too-wide")
    with pytest.raises(ValueError):
        counter.count = value
    assert shard_values("too-wide") == before
    assert_totals(counter, 2 * INT64_MAX)

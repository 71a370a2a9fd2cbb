"""Pure pieces: input checks, key schemes and the cache record. No backends needed."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharded_counter.core.keys import cache_keys, shard_index, shard_key_name
from sharded_counter.core.record import Record, ShardState
from sharded_counter.core.validation import (
    INT64_MAX,
    INT64_MIN,
    MAX_NAME_BYTES,
    check_delta,
    check_name,
    check_shards,
    check_value,
)

names = st.text(min_size=1, max_size=600).filter(
    lambda s: (
        len(s.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)
    )
)


# -- input checks ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, "1", None, True, False, b"1", [1]])
def test_delta_must_be_int(bad: Any) -> None:
    with pytest.raises(TypeError):
        check_delta(bad)


@pytest.mark.parametrize("bad", [INT64_MAX + 1, INT64_MIN - 1, 2**100])
def test_delta_must_fit_a_shard(bad: int) -> None:
    with pytest.raises(ValueError):
        check_delta(bad)


@given(st.integers(INT64_MIN, INT64_MAX))
def test_any_int64_delta_is_accepted(delta: int) -> None:
    assert check_delta(delta) == delta


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("", ValueError),
        (None, TypeError),
        (5, TypeError),
        (b"hits", TypeError),
        ("x" * (MAX_NAME_BYTES + 1), ValueError),
        ("é" * (MAX_NAME_BYTES // 2 + 1), ValueError),  # 2 bytes each in UTF-8
        ("bad\ud800surrogate", ValueError),
    ],
)
def test_bad_names(bad: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        check_name(bad)


@given(names)
def test_any_unicode_name_within_the_limit_is_accepted(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("bad", [0, -3, 1.5, "3", None, True, 10_001])
def test_bad_shard_counts(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        check_shards(bad)


def test_value_must_fit_the_shards() -> None:
    assert check_value(2 * INT64_MAX, 2) == 2 * INT64_MAX
    with pytest.raises(ValueError):
        check_value(2 * INT64_MAX + 1, 2)
    with pytest.raises(TypeError):
        check_value(6.0, 2)


# -- Datastore key names ------------------------------------------------------------


def test_the_original_collision_is_gone() -> None:
    # 'Shard' + name + str(index) gives 'Sharda11' for both of these.
    assert shard_key_name("a1", 1) != shard_key_name("a", 11)


@given(names, st.integers(0, 10_000), names, st.integers(0, 10_000))
def test_key_names_are_unambiguous(n1: str, i1: int, n2: str, i2: int) -> None:
    if (n1, i1) != (n2, i2):
        assert shard_key_name(n1, i1) != shard_key_name(n2, i2)


@given(names, st.integers(0, 10_000))
def test_key_names_fit_and_parse_back(name: str, index: int) -> None:
    key_name = shard_key_name(name, index)
    assert len(key_name.encode("utf-8")) <= 1500
    assert not (key_name.startswith("__") and key_name.endswith("__"))
    assert shard_index(name, key_name) == index


def test_long_names_are_hashed_and_foreign_keys_are_not_ours() -> None:
    long_name = "x" * MAX_NAME_BYTES
    assert shard_key_name(long_name, 3).startswith("3#")
    assert shard_index(long_name, shard_key_name(long_name, 3)) == 3
    for foreign in ["Shardhits3", "hits-3", "03:hits", "3:other", "", None]:
        assert shard_index("hits", foreign) is None


# -- memcache keys ------------------------------------------------------------------


@given(names)
def test_cache_keys_are_safe(name: str) -> None:
    for key in cache_keys("sc", "project//", name):
        assert len(key.encode()) <= 250
        assert all("!" <= ch <= "~" for ch in key)


@given(names, names)
def test_distinct_names_never_share_cache_keys(a: str, b: str) -> None:
    if a != b:
        assert not set(cache_keys("sc", "p//", a)) & set(cache_keys("sc", "p//", b))


def test_scopes_do_not_share_cache_keys() -> None:
    assert cache_keys("sc", "p1//", "hits") != cache_keys("sc", "p2//", "hits")


# -- the cache record -------------------------------------------------------------

states = st.builds(
    ShardState,
    st.sampled_from(["i0", "i1", "i2", "k0123456789ab"]),  # as entities.shard_id makes them
    st.integers(1, 50),
    st.integers(INT64_MIN, INT64_MAX),
)


def consistent(updates: list[ShardState]) -> list[ShardState]:
    """Real versions name one value each: keep the first value seen per (shard, version)."""
    seen: dict[tuple[str, int], int] = {}
    return [
        ShardState(s.shard_id, s.version, seen.setdefault((s.shard_id, s.version), s.value))
        for s in updates
    ]


@given(st.lists(states, max_size=30), st.randoms())
def test_merge_order_does_not_matter(updates: list[ShardState], rnd: random.Random) -> None:
    updates = consistent(updates)
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    one = Record.new(updates)
    other = Record("e", False, {})
    for state in shuffled + updates[:3]:  # repeats are harmless too
        other = other.merged([state])
    assert one.shards == other.shards
    latest: dict[str, tuple[int, int]] = {}
    for s in updates:
        if s.shard_id not in latest or s.version > latest[s.shard_id][0]:
            latest[s.shard_id] = (s.version, s.value)
    assert one.total == sum(v for _, v in latest.values())


@given(st.lists(states, max_size=30), st.booleans())
def test_record_round_trips(updates: list[ShardState], complete: bool) -> None:
    record = Record.new(consistent(updates)).merged([], complete=complete)
    assert Record.decode(record.encode()) == record


@pytest.mark.parametrize("raw", [b"", b"garbage", b"r1|e|x|", b"r1|e|c|i0=1", b"r2|e|c|", b"\xff"])
def test_foreign_cache_values_read_as_a_miss(raw: bytes) -> None:
    assert Record.decode(raw) is None


def test_totals_are_python_ints_beyond_int64() -> None:
    record = Record.new([ShardState(f"i{i}", 1, INT64_MAX) for i in range(3)])
    assert record.total == 3 * INT64_MAX
    assert Record.decode(record.encode()) == record


# -- shard picking ------------------------------------------------------------------


def test_writers_in_one_process_get_distinct_shards_while_any_is_free() -> None:
    from contextlib import ExitStack

    from sharded_counter.paths.picker import ShardPicker

    picker = ShardPicker()
    with ExitStack() as held:
        taken = [held.enter_context(picker.pick(20)) for _ in range(20)]
        assert sorted(index for index, _ in taken) == list(range(20))
        assert all(alone for _, alone in taken)
        extra, alone = held.enter_context(picker.pick(20))  # all busy: any shard will do
        assert 0 <= extra < 20 and not alone  # shared: no transform there
    with picker.pick(3) as (index, alone):  # released shards are free again
        assert 0 <= index < 3 and alone


def test_a_reserved_shard_is_left_alone_until_released() -> None:
    from sharded_counter.paths.picker import ShardPicker

    picker = ShardPicker()
    picker.reserve("t", 1)
    for _ in range(50):
        with picker.pick(4) as (index, alone):
            assert index != 1 and alone
    with picker.pick(4, prefer=1) as (index, alone):  # the write's own retry goes there
        assert index == 1 and not alone
    picker.keep("t")
    assert picker.kept() == {"t"}
    picker.release("t")
    assert picker.kept() == set()
    assert {picker_index(picker, 4) for _ in range(200)} == {0, 1, 2, 3}


def test_a_kept_token_delayed_incr_stopped_naming_lingers_for_a_claims_lifetime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S5'' (docs/protocol.md): the entry may have been lost, not resolved, while another
    process's resolver had it claimed and had yet to look for the token in our slot.
    Until that claim lapses the token stays pinned and its shard reserved."""
    from sharded_counter.paths import picker as picking

    now = [100.0]
    monkeypatch.setattr(picking.time, "monotonic", lambda: now[0])
    picker = picking.ShardPicker()
    picker.reserve("t", 1)
    picker.keep("t")
    picker.linger("t", 20.0)
    assert picker.kept() == set()  # no longer resolved by this process
    assert "t" in picker.pinned()
    with picker.pick(4, prefer=1) as (_, alone):
        assert not alone  # no transform of ours replaces the slot there
    now[0] += 19.9
    picker.linger("t", 20.0)  # seen gone again: the first lifetime holds, not renewed
    assert "t" in picker.pinned()
    now[0] += 0.2
    assert "t" not in picker.pinned()
    with picker.pick(4, prefer=1) as (_, alone):
        assert alone
    picker.reserve("u", 2)  # a write still retrying is not kept: linger leaves it be
    picker.linger("u", 0.0)
    assert "u" in picker.pinned()


def picker_index(picker: Any, shards: int) -> int:
    with picker.pick(shards) as (index, _):
        return int(index)


def test_only_failures_that_may_have_been_applied_count_as_unknown_outcomes() -> None:
    from google.api_core import exceptions as gexc

    from sharded_counter.store.retry import outcome_unknown

    assert outcome_unknown(gexc.DeadlineExceeded("Deadline Exceeded"))
    assert outcome_unknown(gexc.ServiceUnavailable("Socket closed"))
    assert outcome_unknown(gexc.InternalServerError("boom"))
    assert not outcome_unknown(gexc.Aborted("too much contention"))
    assert not outcome_unknown(gexc.ResourceExhausted("quota"))
    refused = "failed to connect to all addresses; last error: Connection refused"
    assert not outcome_unknown(gexc.ServiceUnavailable(refused))


def test_every_public_error_is_ours_and_every_returned_type_is_exported() -> None:
    """One hierarchy: whatever the library raises on purpose is a ShardedCounterError
    (bad input aside), and the types it hands back can be imported from the package."""
    import sharded_counter
    from sharded_counter.cache.memcached.cluster import ServerUnavailable

    errors = [getattr(sharded_counter, n) for n in sharded_counter.__all__]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, BaseException)]
    assert {e.__name__ for e in errors} >= {"RateLimited", "Locked", "DatastoreUnavailable"}
    for error in [*errors, ServerUnavailable]:
        assert issubclass(error, sharded_counter.ShardedCounterError), error
    assert {"Verification", "Lease", "Holder", "Decision"} <= set(sharded_counter.__all__)


def test_a_transform_is_noted_only_while_its_writer_has_the_shard_to_itself() -> None:
    """W12: a transform is noted (and from then on waited for by writes of its process
    to that shard) in the same step that checks nobody else of the process holds the
    shard; a writer or resolver that picked it first makes it a transaction."""
    from sharded_counter.paths.picker import ShardPicker

    picker = ShardPicker()
    with picker.pick(3, prefer=0) as (_, alone):
        assert alone
        with picker.pick(3, prefer=0):  # a resolution of this process holds it too
            assert not picker.transform_claimed("t1", 0)
        assert picker.transform_claimed("t1", 0)
        assert picker.transforms_pending(0) == (True, [])
        picker.transform_sent("t1", 0, b"txn")
        picker.transform_left("t1")  # its writer could not fence it
        assert picker.transforms_pending(0) == (False, [("t1", b"txn")])
        assert picker.transform_left_unfenced("t1") == b"txn"
        picker.transform_over("t1")
        assert picker.transforms_pending(0) == (False, [])
    picker.reserve("u1", 1)
    with picker.pick(3, prefer=1):
        assert not picker.transform_claimed("t2", 1)  # an unsure write's shard

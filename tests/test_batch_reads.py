"""Counter.get_counts: many totals in one memcache round trip and one Datastore read."""

from __future__ import annotations

from typing import Any

import pytest

from sharded_counter import Counter

pytestmark = pytest.mark.backends


def test_get_counts_mixes_cached_and_uncached_totals(
    sharded_counter_env: dict[str, str], sharded_counter_cache: Any
) -> None:
    names = [f"page-{i}" for i in range(40)]  # more than one IN filter holds
    for i, name in enumerate(names):
        if i % 3:
            Counter(name).increment(i)
    assert Counter("page-1").count == 1  # one of them is cached now
    sharded_counter_cache.flush_all()
    Counter("page-2").count  # noqa: B018 - and this one again, after the flush
    expected = {name: (i if i % 3 else 0) for i, name in enumerate(names)}
    assert Counter.get_counts(names) == expected
    assert Counter.get_counts(names) == expected  # now every one is cached
    assert Counter.get_counts(names, nocache=True) == expected
    assert all(Counter(name).verify().ok for name in names)


def test_get_counts_follows_writes_and_subclass_settings(
    sharded_counter_env: dict[str, str],
) -> None:
    class Wide(Counter):
        shards = 50

    Wide("a").increment(2)
    assert Wide.get_counts(["a", "b", "a"]) == {"a": 2, "b": 0}
    Wide("b").increment(-4)
    Wide("a").increment(1)
    assert Wide.get_counts(["a", "b"]) == {"a": 3, "b": -4}
    assert Wide.get_counts([]) == {}


def test_get_counts_without_memcache(sharded_counter_env: dict[str, str]) -> None:
    Counter("x", memcached_hosts=()).increment(5)
    assert Counter.get_counts(["x", "y"], memcached_hosts=()) == {"x": 5, "y": 0}


def test_get_counts_refuses_bad_names_before_reading(sharded_counter_env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Counter.get_counts(["ok", ""])
    with pytest.raises(TypeError):
        Counter.get_counts(["ok", 3])  # type: ignore[list-item]

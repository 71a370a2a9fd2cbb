"""Names the library makes for itself cannot be reached from a user's names (issue 26).

Time-series bucket counters are named ``INTERNAL_PREFIX`` + length-prefixed parts,
a prefix ``check_name`` refuses to users; the SharedBuffer flush lock's key hashes
its parts separately, where a ``lock(name)`` key hashes the one name. Real
memcached and emulators, both engines; property tests for the name forms.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharded_counter import Counter, Locked, SharedBuffer, lock
from sharded_counter.cache.client import key_digest
from sharded_counter.core.validation import INTERNAL_PREFIX, check_name, internal_name
from sharded_counter.patterns.lock import internal_lock, lock_key
from sharded_counter_emulator import Memcached, RedisServer, free_port

parts = st.lists(st.text(max_size=20), min_size=1, max_size=5)


@given(user=st.text(min_size=1, max_size=40))
def test_check_name_refuses_every_user_name_in_the_internal_form(user: str) -> None:
    name = INTERNAL_PREFIX + user
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return  # refused for that already
    with pytest.raises(ValueError, match="library's own"):
        check_name(name)


@given(a=parts, b=parts)
def test_two_tuples_of_parts_never_share_an_internal_name(a: list[str], b: list[str]) -> None:
    assert (internal_name(*a) == internal_name(*b)) == (a == b)


@given(user=st.text(max_size=60), a=parts)
def test_no_user_lock_name_gives_an_internal_lock_key(user: str, a: list[str]) -> None:
    """``key_digest`` length-prefixes each part: a one-part and a two-or-more-part
    input never hash the same bytes."""
    joined_user = f"{len(user)}:{user}"
    joined_internal = "".join(f"{len(p)}:{p}" for p in ["flush", *a])
    assert joined_user != joined_internal
    assert lock_key("sc", user) != f"sc:lock:{key_digest('flush', *a)}"


def test_a_user_lock_named_like_a_flush_lock_does_not_hold_a_flush_back(
    sharded_counter_env: dict[str, str],
) -> None:
    buffer = SharedBuffer(interval=5.0)
    buffer.increment("page:home", 3)
    scope = buffer._scope
    # The name the flush lock had before: a user could take it and stall every flush.
    with lock(f"flush:{scope}:page:home", ttl=30):
        assert buffer.flush("page:home") == ["page:home"]
    assert Counter("page:home").get_count(nocache=True) == 3
    # The flush lock itself is still exclusive among flushers.
    held = internal_lock("flush", scope, "page:home", ttl=30)
    with held:
        buffer.increment("page:home", 2)
        assert buffer.flush("page:home") == []  # another flusher holds it
        with pytest.raises(Locked):
            internal_lock("flush", scope, "page:home", ttl=30).acquire()
    assert buffer.flush("page:home") == ["page:home"]
    assert Counter("page:home").get_count(nocache=True) == 5


def test_a_flush_lock_lives_in_the_buffers_own_cache(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Memcached | RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A buffer given its cache (``cache_url``) takes its flush locks there too, with
    its own settings: not on the servers MEMCACHED_HOSTS names, nothing listening."""
    monkeypatch.setenv("MEMCACHED_HOSTS", f"127.0.0.1:{free_port()}")
    monkeypatch.delenv("SHARDED_COUNTER_CACHE_URL", raising=False)
    buffer = SharedBuffer(interval=60, cache_url=sharded_counter_cache.url)
    buffer.increment("page:home", 3)
    held = internal_lock("flush", buffer._scope, "page:home", ttl=30, settings=buffer.settings)
    with held:
        assert buffer.flush_holder("page:home") is not None
        assert buffer.flush("page:home") == []  # held, in the buffer's cache
    assert buffer.flush_holder("page:home") is None
    assert buffer.flush("page:home") == ["page:home"]
    assert Counter("page:home", cache_url=sharded_counter_cache.url).get_count(nocache=True) == 3

"""core/: the pure decisions about tokens, fences and shares, without any backend."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sharded_counter.core import tokens
from sharded_counter.core.bounds import spread, within
from sharded_counter.core.validation import INT64_MAX

NOW = 1_800_000_000


def token_at(seconds: float, n: int = 0) -> str:
    return f"{int(seconds):08x}{n:08x}"


def test_a_write_finds_its_token_or_its_fold_token() -> None:
    token = token_at(NOW)
    assert tokens.left_to_write(token, 7, 0, [token], []) is None  # it landed
    assert tokens.left_to_write(token, 7, 0, ["other"], []) == 7
    # Its fold part was written in its place: only its own delta is left...
    assert tokens.left_to_write(token, 1007, 1000, [], [tokens.fold_token(token)]) == 7
    # ...and nothing when the write was nothing but the fold.
    assert tokens.left_to_write(token, 1000, 1000, [], [tokens.fold_token(token)]) is None


@given(st.lists(st.integers(0, 50), max_size=30), st.sets(st.integers(0, 50), max_size=5))
def test_a_slot_keeps_its_last_tokens_and_every_pinned_one(
    mine: list[int], pinned: set[int]
) -> None:
    slot = [token_at(NOW, n) for n in mine]
    pins = {token_at(NOW, n) for n in pinned}
    new = token_at(NOW, 99)
    kept = tokens.slot_after_write(slot, new, pins)
    assert kept[-1] == new
    assert set([*slot, new][-tokens.SLOT_TOKENS_KEPT :]) <= set(kept)
    assert {t for t in slot if t in pins} <= set(kept)
    assert len([t for t in kept if t not in pins]) <= tokens.SLOT_TOKENS_KEPT
    assert tokens.slot_after_write(slot, "", pins) == slot  # no token: the slot as read


def test_a_slot_is_stale_only_when_all_its_tokens_are_over_a_day_old() -> None:
    old, fresh = token_at(NOW - tokens.SLOT_TTL - 1), token_at(NOW - 10)
    assert tokens.slot_is_stale([old], NOW)
    assert not tokens.slot_is_stale([old, fresh], NOW)
    assert not tokens.slot_is_stale([], NOW)
    assert not tokens.slot_is_stale(["w-of-an-earlier-version"], NOW)  # no time: kept


def test_the_fence_keeps_the_newest_tokens_under_a_day_old() -> None:
    fenced = [token_at(NOW - i, i) for i in range(tokens.FENCE_KEPT + 40)]
    old = token_at(NOW - tokens.SLOT_TTL - 1)
    kept = tokens.fence_after_write([*fenced, old, "legacy"], NOW)
    assert old not in kept
    assert len(kept) == tokens.FENCE_KEPT
    assert token_at(NOW, 0) in kept  # the newest stay
    assert token_at(NOW - tokens.FENCE_KEPT - 39, tokens.FENCE_KEPT + 39) not in kept


@given(st.integers(-(2**70), 2**70), st.integers(1, 60))
def test_spread_is_even_and_adds_up(value: int, slots: int) -> None:
    try:
        amounts = spread(value, slots)
    except ValueError:
        assert not within(value // slots + (value % slots > 0), INT64_MAX) or not within(
            value // slots, INT64_MAX
        )
        return
    assert sum(amounts) == value and len(amounts) == slots
    assert max(amounts) - min(amounts) <= 1

"""What the delayed_incr key holds (stash.py): its text form and its changes."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from sharded_counter.stash import Stash

tokens = st.text("0123456789abcdef", min_size=12, max_size=12)
amounts = st.integers(min_value=-(2**63), max_value=2**63 - 1)
deadlines = st.floats(min_value=1e9, max_value=4e9).map(lambda t: round(t, 3))


@given(
    pending=amounts,
    folds=st.dictionaries(tokens, st.tuples(amounts, deadlines), max_size=4),
    setter=st.none() | st.tuples(tokens, deadlines),
)
def test_every_stash_reads_back_as_written(
    pending: int, folds: dict[str, tuple[int, float]], setter: tuple[str, float] | None
) -> None:
    stash = Stash(pending, folds, setter)
    assert Stash.decode(stash.encode()) == stash


def test_a_plain_integer_of_earlier_versions_is_the_pending_amount() -> None:
    assert Stash.decode(b"-42") == Stash(-42)
    assert Stash.decode(None) == Stash.decode(b"") == Stash()


def test_anything_unreadable_counts_as_empty() -> None:
    for raw in (b"x", b"1;f=oops", b"1;fabc=1@never", "é".encode()):
        assert Stash.decode(raw) == Stash()


def test_a_fold_takes_everything_pending_and_marks_the_key_until_it_settles() -> None:
    later = time.time() + 60
    taken = Stash(7).taken("t1", later)
    assert taken.pending == 0 and dict(taken.folds) == {"t1": (7, later)}
    assert taken.added(3).settled("t1", 0) == Stash(3)  # landed: the marker goes
    assert taken.added(3).released("t1") == Stash(10)  # failed: the 7 waits again
    assert taken.released("t1").released("t1") == Stash(7)  # settling twice changes nothing


def test_markers_past_their_deadline_are_ignored() -> None:
    now = time.time()
    stash = Stash(1, {"old": (5, now - 1), "new": (6, now + 60)}, ("s", now - 1))
    live = stash.live(now)
    assert dict(live.folds) == {"new": (6, now + 60)}
    assert live.setter is None
    assert live.pending == 1


def test_a_set_holds_the_key_and_returns_what_it_took_only_when_it_failed() -> None:
    later = time.time() + 60
    begun = Stash(9).set_begun("s1", later)
    assert begun.setter == ("s1", later)
    emptied = begun.added(-begun.pending)
    assert emptied.set_ended(0) == Stash(0)
    assert emptied.set_ended(9) == Stash(9)

"""What the delayed_incr key holds (core/stash.py): its text form and its changes."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from sharded_counter.core.stash import ANY_SHARD, Fold, Stash, Unsure
from sharded_counter.core.tokens import fold_token

tokens = st.text("0123456789abcdef", min_size=12, max_size=12)
write_tokens = tokens | tokens.map(fold_token)
amounts = st.integers(min_value=-(2**63), max_value=2**63 - 1)
deadlines = st.floats(min_value=1e9, max_value=4e9).map(lambda t: round(t, 3))
shards = st.integers(min_value=ANY_SHARD, max_value=999)


folds = st.builds(Fold, amounts, deadlines) | st.builds(Fold, amounts, deadlines, tokens)
transactions = st.just(b"") | st.binary(min_size=1, max_size=64)
unsure_writes = st.builds(
    Unsure,
    amounts,
    shards,
    folded=st.just(0) | amounts,
    transaction=transactions,
) | st.builds(
    Unsure,
    amounts,
    shards,
    tokens,
    deadlines,
    folded=st.just(0) | amounts,
    transaction=transactions,
)


@given(
    pending=amounts,
    folds=st.dictionaries(tokens, folds, max_size=4),
    setter=st.none() | st.tuples(tokens, deadlines),
    unsure=st.dictionaries(write_tokens, unsure_writes, max_size=4),
    set_taken=amounts,
)
def test_every_stash_reads_back_as_written(
    pending: int,
    folds: dict[str, Fold],
    setter: tuple[str, float] | None,
    unsure: dict[str, Unsure],
    set_taken: int,
) -> None:
    stash = Stash(pending, folds, setter, unsure, set_taken if setter else 0)
    assert Stash.decode(stash.encode()) == stash


def test_a_plain_integer_of_earlier_versions_is_the_pending_amount() -> None:
    assert Stash.decode(b"-42") == Stash(-42)
    assert Stash.decode(None) == Stash.decode(b"") == Stash()


def test_anything_unreadable_counts_as_empty() -> None:
    unreadable = (
        *(b"x", b"1;f=oops", b"1;fabc=1@never", b"1;uabc=1", b"1;uabc=1/2/c", "é".encode()),
        *(b"1;fabc=1@5.0!", b"1;sabc=x@5.0", b"1;sabc=1@never", b"1;uabc=1+/2"),
        # a transaction that is empty, no base64url (padded, '+'), or no whole byte
        *(b"1;uabc=1/2~", b"1;uabc=1/2~ab==", b"1;uabc=1/2~a+b", b"1;uabc=1/2~abcde"),
        b"1;uabc=1/2~" + b"a" * 600,
    )
    for raw in unreadable:
        assert Stash.decode(raw) == Stash()


def test_a_fold_takes_everything_pending_and_marks_the_key_until_it_settles() -> None:
    later = time.time() + 60
    taken = Stash(7).taken("t1", later)
    assert taken.pending == 0 and dict(taken.folds) == {"t1": Fold(7, later)}
    assert taken.added(3).landed("t1") == Stash(3)  # landed: the marker goes
    assert taken.added(3).released("t1") == Stash(10)  # failed: the 7 waits again
    assert taken.released("t1").released("t1") == Stash(7)  # settling twice changes nothing


def test_a_fold_past_its_deadline_becomes_an_unsure_fold_part_for_any_shard() -> None:
    now = time.time()
    stalled = Stash(2, {"late": Fold(5, now - 0.001), "busy": Fold(3, now + 60)})
    seen = stalled.live(now)
    # Its writer died or stalled past its limits: what it took is owed, and one
    # transaction over every shard resolves it (the write's token, or the fold part's).
    assert dict(seen.folds) == {"busy": Fold(3, now + 60)}
    assert dict(seen.unsure) == {fold_token("late"): Unsure(5, ANY_SHARD)}
    assert seen.owed == 2 + 5 and seen.claimable() == [fold_token("late")]
    assert seen.mentions("late") and seen.mentions("busy") and not seen.mentions("other")
    # The writer settling late changes nothing: the fold part's resolution decides.
    assert seen.released("late") == seen.landed("late") == seen
    assert not seen.resolved(fold_token("late")).mentions("late")


def test_a_set_takes_what_is_pending_and_fences_the_folds_in_flight() -> None:
    later = time.time() + 60
    folding = Stash(7).taken("f1", later).added(9)
    begun = folding.set_begun("s1", later)
    assert begun.setter == ("s1", later) and (begun.pending, begun.set_taken) == (0, 9)
    assert begun.owed == 9  # counted until the set lands
    assert dict(begun.folds) == {"f1": Fold(7, later, "s1")}
    assert folding.fence == ["f1"]  # the set writes this token (and its own) onto the shards
    assert Stash.decode(b"3;ss1@5.0") == Stash(3, setter=("s1", 5.0))  # earlier versions
    # The set landed: everything it took or fenced was replaced by it.
    assert begun.set_ended("s1", landed=True) == Stash()
    assert begun.landed("f1").set_ended("s1", landed=True) == Stash()
    # A fenced fold that fails waits as an unsure entry on shard 0: the shards' fence
    # shows whether its set landed.
    failed = begun.released("f1")
    assert dict(failed.unsure) == {"f1": Unsure(7, 0, folded=7)} and not failed.folds
    assert failed.released("f1") == failed  # settling twice changes nothing


def test_a_set_that_did_not_land_leaves_the_shards_fence_to_decide() -> None:
    later = time.time() + 60
    begun = Stash(7).taken("f1", later).added(9).set_begun("s1", later)
    ended = begun.set_ended("s1", landed=False)
    # What it took waits under its own token; the fold stays fenced.
    assert ended == Stash(0, {"f1": Fold(7, later, "s1")}, unsure={"s1": Unsure(9, 0)})
    assert ended.set_ended("s1", landed=True) == ended  # over already: changes nothing


def test_a_set_whose_marker_expired_counts_as_not_landed() -> None:
    now = time.time()
    begun = Stash(9).made_unsure("u1", 5, 3).set_begun("s1", now + 30)
    assert begun.unsure["u1"].claim == "s1"  # claimed by the set: no resolution meanwhile
    assert begun.claimable() == []
    dead = begun.live(now + 31)  # the setter died, or stalled past its own limits
    assert dead.setter is None and dead.owed == 9 + 5
    assert dict(dead.unsure) == {"u1": Unsure(5, 3), "s1": Unsure(9, 0)}
    assert dead == begun.set_ended("s1", landed=False)


def test_an_unsure_write_replaces_its_fold_marker_and_is_owed_until_resolved() -> None:
    later = time.time() + 60
    folding = Stash(7).taken("t1", later)
    unsure = folding.made_unsure("t1", 7 + 5, shard=3, folded=7)  # its own 5, the 7 it folded
    assert dict(unsure.folds) == {} and dict(unsure.unsure) == {"t1": Unsure(12, 3, folded=7)}
    assert unsure.pending == 0 and unsure.owed == 12  # readers count it
    assert unsure.resolved("t1") == Stash()  # its shard holds it now
    assert unsure.resolved("t1").resolved("t1") == Stash()  # repeating changes nothing
    assert unsure.resolved("t1", back=12) == Stash(12)  # it did not land: pending now


def test_an_unsure_transform_carries_its_transaction_until_it_is_resolved() -> None:
    """A transform its writer could not fence keeps its transaction in the entry, for
    whoever resolves it to roll back first (docs/protocol.md, W6'), also while claimed."""
    unsure = Stash(3).made_unsure("t1", 5, 2, transaction=b"\x00txn\xff")
    assert unsure.encode() == b"3;ut1=5/2~AHR4bv8"
    claimed = Stash.decode(unsure.claimed("c1", 2e9, ["t1"]).encode())
    assert claimed.unsure["t1"] == Unsure(5, 2, "c1", 2e9, transaction=b"\x00txn\xff")
    assert claimed.unclaimed("t1", "c1").unsure["t1"].transaction == b"\x00txn\xff"


def test_an_unsure_write_is_resolved_by_one_claimer_at_a_time() -> None:
    now = time.time()
    stash = Stash(1).made_unsure("a", 5, 0).made_unsure("b", 6, 1)
    assert stash.claimable() == ["a", "b"]
    mine = stash.claimed("c1", now + 60, ["a"])
    assert mine.claimable() == ["b"]
    assert mine.claimed("c2", now + 60, ["a"]) == mine  # already claimed: unchanged
    assert mine.unclaimed("a", "c2") == mine  # only its claimer opens it again
    assert mine.unclaimed("a", "c1") == stash
    lapsed = stash.claimed("c1", now - 1, ["a"]).live(now)
    assert lapsed == stash  # a claimer that died: open again at its deadline
    assert stash.set_begun("s", now + 60).claimable() == []  # none while a set runs


def test_a_set_claims_the_unsure_writes_over_any_resolver() -> None:
    later = time.time() + 60
    stash = Stash(4).made_unsure("a", 5, 0).claimed("c", later, ["a"])
    begun = stash.set_begun("s", later)
    assert stash.fence == ["a"]  # fenced: a late resolution writes nothing
    assert begun.unclaimed("a", "c") == begun  # the resolver gave up: the set's now
    assert begun.resolved("a").set_ended("s", landed=True) == Stash()  # it landed first
    assert begun.set_ended("s", landed=True) == Stash()
    restored = begun.added(2).set_ended("s", landed=False)
    assert restored.pending == 2
    assert dict(restored.unsure) == {"a": Unsure(5, 0), "s": Unsure(4, 0)}


def test_a_move_between_servers_carries_pending_and_open_unsure_writes() -> None:
    later = time.time() + 60
    source = Stash(4).made_unsure("a", 5, 0).made_unsure("b", 6, 1).claimed("c", later, ["b"])
    moving = source.movable()
    assert moving.pending == 4 and set(moving.unsure) == {"a"}
    left = source.without(moving)
    assert left.pending == 0 and set(left.unsure) == {"b"}  # its claimer is working on it
    home = Stash(1).absorbed(moving)
    assert home.owed == 1 + 4 + 5


def test_a_write_and_its_fold_part_are_owed_once_and_settle_each_other() -> None:
    now = time.time()
    # The write gave up unsure after its fold's deadline: both have entries.
    both = Stash(0, {"t": Fold(7, now - 1)}).live(now).made_unsure("t", 5 + 7, 2, folded=7)
    part = fold_token("t")
    assert set(both.unsure) == {"t", part}
    assert both.owed == 12  # the 7 once
    # One resolver takes both; nobody takes one while the other is being resolved.
    assert both.claimable() == ["t", part]
    assert both.claimed("c", now + 60, ["t"]).claimable() == []
    assert set(both.claimed("c", now + 60, ["t"]).movable().unsure) == set()
    # The write is in the shards: so is its fold part.
    assert both.resolved("t") == Stash()
    # The fold part is in the shards: the write has only its own 5 left.
    assert dict(both.resolved(part).unsure) == {"t": Unsure(5, 2)}
    # The write goes back whole (nobody had written its fold part when it looked):
    # its own 5 waits as pending, the 7 stays with the fold part's entry.
    back = both.resolved("t", back=12)
    assert back.pending == 5 and dict(back.unsure) == {part: Unsure(7, ANY_SHARD)}
    # It goes back without the fold part (a resolution had written it): just the 5.
    assert both.resolved("t", back=5).pending == 5

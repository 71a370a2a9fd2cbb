"""core/escrow.py: how a bounded counter's shards share its room, without any backend.

The stateful test drives the decisions as the write path does (a shard's own
share, else a snapshot, donors and a borrow, with snapshots that may be stale)
and checks after every step that the shares still add up (E1), every shard
keeps within its own (E2), the total within the bounds, and that a refusal
happens only when the room was really gone.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sharded_counter.core import escrow
from sharded_counter.core.escrow import Bounds, Share


def check(shares: list[Share], bounds: Bounds) -> None:
    total = sum(s.count for s in shares)
    assert bounds.contains(total)
    if bounds.maximum is not None:
        assert sum(s.cap for s in shares if s.cap is not None) == bounds.maximum
    if bounds.minimum is not None:
        assert sum(s.floor for s in shares if s.floor is not None) == bounds.minimum
    for share in shares:
        assert share.cap is None or share.count <= share.cap
        assert share.floor is None or share.floor <= share.count


@given(
    st.integers(-1000, 1000),
    st.integers(1, 40),
    st.one_of(st.none(), st.integers(0, 500)),
    st.one_of(st.none(), st.integers(0, 500)),
)
def test_a_layout_deals_the_total_and_each_bounds_room_evenly(
    total: int, shards: int, below: int | None, above: int | None
) -> None:
    bounds = Bounds(
        None if below is None else total - below, None if above is None else total + above
    )
    shares = escrow.laid_out(total, shards, bounds)
    check(shares, bounds)
    for upward in (True, False):
        rooms = [s.room(upward) for s in shares]
        if rooms[0] is not None:
            assert max(r or 0 for r in rooms) - min(r or 0 for r in rooms) <= 1


def test_a_layout_refuses_a_total_outside_the_bounds() -> None:
    with pytest.raises(ValueError, match="outside the bounds"):
        escrow.laid_out(11, 4, Bounds(0, 10))


def test_a_lone_writer_reaches_the_maximum_exactly_and_no_further() -> None:
    bounds = Bounds(0, 300)
    shares = {s.index: s for s in escrow.laid_out(0, 20, bounds)}
    rng = random.Random(7)
    done = 0
    while True:
        index = rng.randrange(20)
        added = escrow.adding(shares[index], 1)
        if added is not None:
            shares[index] = added
            done += 1
            continue
        lenders = escrow.donors(list(shares.values()), index, 1, rng)
        if lenders is None:
            break
        pool = [shares[index], *(shares[i] for i in lenders)]
        for share in escrow.rebalanced(pool, index, 1) or []:
            shares[share.index] = share
        done += 1
    assert done == 300
    check(list(shares.values()), bounds)


def test_a_decrement_borrows_downward_room_and_leaves_the_caps() -> None:
    shares = escrow.laid_out(50, 5, Bounds(0, 100))
    drained = [Share(s.index, s.floor or 0, s.cap, s.floor) for s in shares]
    drained[0] = shares[0]  # only shard 0 still has room to give
    bounds_total = sum(s.count for s in drained)
    lenders = escrow.donors(drained, 3, -4)
    assert lenders == [0]
    after = escrow.rebalanced([drained[3], drained[0]], 3, -4)
    assert after is not None
    assert [s.cap for s in after] == [drained[3].cap, drained[0].cap]
    assert sum(s.count for s in after) == drained[3].count + drained[0].count - 4
    assert sum(s.count for s in drained) == bounds_total


def test_an_unbounded_side_never_refuses() -> None:
    shares = escrow.laid_out(0, 3, Bounds(minimum=0))
    assert all(s.fits(10**12) for s in shares)
    assert escrow.donors(shares, 0, 10**12) == []
    assert not shares[0].fits(-1)
    assert escrow.donors(shares, 0, -1) is None


def test_a_delta_wider_than_the_bounds_can_never_fit() -> None:
    assert not escrow.can_ever_fit(11, Bounds(0, 10))
    assert escrow.can_ever_fit(-10, Bounds(0, 10))
    assert escrow.can_ever_fit(10**15, Bounds(maximum=0))


class EscrowMachine(RuleBasedStateMachine):
    """Shards, bounds, and writers who may act on a stale snapshot."""

    @initialize(
        shards=st.integers(1, 8),
        minimum=st.one_of(st.none(), st.integers(-50, 0)),
        maximum=st.one_of(st.none(), st.integers(0, 50)),
    )
    def lay_out(self, shards: int, minimum: int | None, maximum: int | None) -> None:
        self.bounds = Bounds(minimum, maximum)
        self.shares = {s.index: s for s in escrow.laid_out(0, shards, self.bounds)}
        self.stale = list(self.shares.values())

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shares.values())

    @rule()
    def take_a_snapshot(self) -> None:
        self.stale = list(self.shares.values())

    @rule(index=st.integers(0, 7), delta=st.integers(-6, 6).filter(bool), seed=st.integers())
    def increment(self, index: int, delta: int, seed: int) -> None:
        index %= len(self.shares)
        added = escrow.adding(self.shares[index], delta)
        if added is not None:
            self.shares[index] = added
            return
        # Donors picked from a snapshot that may be stale; the borrow re-reads its shards.
        lenders = escrow.donors(self.stale, index, delta, random.Random(seed))
        if lenders is None:
            lenders = escrow.donors(list(self.shares.values()), index, delta)
            if lenders is None:
                # A refusal: only when the bounds really leave no room.
                assert not self.bounds.contains(self.total + delta)
                return
        pool = [self.shares[index], *(self.shares[i] for i in lenders)]
        after = escrow.rebalanced(pool, index, delta)
        if after is None:
            return  # stale: the write path looks again
        for share in after:
            self.shares[share.index] = share

    @rule(value=st.integers(-60, 60))
    def set_total(self, value: int) -> None:
        if self.bounds.contains(value):
            self.shares = {
                s.index: s for s in escrow.laid_out(value, len(self.shares), self.bounds)
            }

    @invariant()
    def shares_add_up(self) -> None:
        check(list(self.shares.values()), self.bounds)


TestEscrowMachine = EscrowMachine.TestCase
TestEscrowMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_a_total_past_a_bound_is_given_as_that_bound() -> None:
    bounds = Bounds(0, 10)
    assert [bounds.clamp(t) for t in (-3, 0, 7, 10, 12)] == [0, 0, 7, 10, 10]
    assert Bounds().clamp(-(10**9)) == -(10**9)


def test_a_borrow_whose_shares_would_leave_int64_is_caught() -> None:
    # A valid state (caps add up to the maximum, 2**63 - 1): shard 0 full at 2**62,
    # shard 1 far below zero with the rest of the room. Pooling them gives shard 0 a
    # cap of 2**63, which no Datastore integer holds: the store refuses the write
    # (FieldOverflow, CounterOverflowError to the caller) before anything is written.
    full = Share(0, count=2**62, cap=2**62, floor=None)
    low = Share(1, count=-(2**62), cap=2**63 - 1 - 2**62, floor=None)
    assert (full.cap or 0) + (low.cap or 0) == 2**63 - 1
    after = escrow.rebalanced([full, low], 0, 1)
    assert after is not None
    assert not all(share.fields_fit_int64() for share in after)

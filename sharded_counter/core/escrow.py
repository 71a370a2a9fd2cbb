"""Escrow: how a bounded counter's shards share its headroom. Pure: no I/O.

A bounded counter keeps its total within ``[minimum, maximum]`` (either may be
None) without a global lock, after O'Neil's escrow method: each shard holds,
besides its ``count``, its own ``cap`` (its share of ``maximum``) and ``floor``
(its share of ``minimum``), so that

* E1. the caps sum to ``maximum`` and the floors to ``minimum`` (when set);
* E2. every shard keeps ``floor <= count <= cap``.

E2 summed over the shards is ``minimum <= total <= maximum``. An increment
checks and writes one shard, in one transaction: it fits when it keeps that
shard within its own cap and floor. A shard whose share is short *borrows*:
one transaction over it and one or more donors pools their room in the
increment's direction, applies the increment and deals the rest out evenly
(``rebalanced``). Only when every shard together lacks the room, read in one
consistent snapshot, is the increment refused. Caps and floors move only
inside those transactions and when bounds or the total are set (``laid_out``),
so E1 holds at every commit.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Collection, Sequence

from .bounds import spread
from .validation import fits_int64


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range a bounded counter's total keeps to; None is no bound on that side."""

    minimum: int | None = None
    maximum: int | None = None

    def contains(self, total: int) -> bool:
        return (self.minimum is None or self.minimum <= total) and (
            self.maximum is None or total <= self.maximum
        )

    def clamp(self, total: int) -> int:
        """``total``, or the bound it is past."""
        if self.minimum is not None and total < self.minimum:
            return self.minimum
        if self.maximum is not None and total > self.maximum:
            return self.maximum
        return total

    def describe(self) -> str:
        low = "-inf" if self.minimum is None else str(self.minimum)
        high = "+inf" if self.maximum is None else str(self.maximum)
        return f"[{low}, {high}]"


@dataclasses.dataclass(frozen=True)
class Share:
    """One shard as escrow sees it: its count, and its share of each bound."""

    index: int
    count: int
    cap: int | None  # None: no maximum
    floor: int | None  # None: no minimum

    def room(self, upward: bool) -> int | None:
        """How much this shard may still add (``upward``) or take away; None: unbounded."""
        if upward:
            return None if self.cap is None else max(0, self.cap - self.count)
        return None if self.floor is None else max(0, self.count - self.floor)

    def fits(self, delta: int) -> bool:
        room = self.room(delta > 0)
        return room is None or abs(delta) <= room

    def fields_fit_int64(self) -> bool:
        return all(fits_int64(v) for v in (self.count, self.cap, self.floor) if v is not None)


def adding(share: Share, delta: int) -> Share | None:
    """``share`` with ``delta`` added, or None when it does not fit its own share."""
    if not share.fits(delta):
        return None
    return dataclasses.replace(share, count=share.count + delta)


def pooled(shares: Sequence[Share], upward: bool) -> int | None:
    """The room of ``shares`` together in one direction (None: that side is unbounded)."""
    rooms = [s.room(upward) for s in shares]
    if any(r is None for r in rooms):
        return None
    return sum(r for r in rooms if r is not None)


def rebalanced(shares: Sequence[Share], taker: int, delta: int) -> list[Share] | None:
    """``shares`` after adding ``delta`` to the one with index ``taker``, their pooled room
    in that direction dealt out evenly again; None when the pool is short.

    Only the bound on the side ``delta`` moves towards changes: an increment
    spends room under the caps and leaves every floor where it was (the
    taker's count only moves away from its floor), and a decrement the reverse.
    """
    upward = delta > 0
    room = pooled(shares, upward)
    if room is not None and room < abs(delta):
        return None
    counts = [s.count + (delta if s.index == taker else 0) for s in shares]
    if room is None:
        return [dataclasses.replace(s, count=c) for s, c in zip(shares, counts, strict=True)]
    portions = spread(room - abs(delta), len(shares))
    result = []
    for share, count, portion in zip(shares, counts, portions, strict=True):
        if upward:
            result.append(dataclasses.replace(share, count=count, cap=count + portion))
        else:
            result.append(dataclasses.replace(share, count=count, floor=count - portion))
    return result


def donors(
    shares: Sequence[Share],
    taker: int,
    delta: int,
    rng: random.Random | None = None,
    *,
    avoid: Collection[int] = (),
) -> list[int] | None:
    """Indexes of shards (other than ``taker``) whose room, with the taker's, covers
    ``delta``: picked at random among those with room, so that writers short at
    the same moment seldom pick the same donor, and among ``avoid`` (shards other
    writers of this process hold) only when the others lack it. None when all of
    ``shares`` together lack the room: the increment must be refused.
    """
    upward = delta > 0
    pool = pooled(shares, upward)
    if pool is not None and pool < abs(delta):
        return None
    by_index = {s.index: s for s in shares}
    own = by_index[taker].room(upward) if taker in by_index else 0
    need = abs(delta) - (own or 0)
    candidates = [s for s in shares if s.index != taker and (s.room(upward) or 0) > 0]
    (rng or random).shuffle(candidates)
    candidates.sort(key=lambda share: share.index in avoid)  # stable: still shuffled
    chosen: list[int] = []
    for share in candidates:
        if need <= 0:
            break
        chosen.append(share.index)
        need -= share.room(upward) or 0
    return chosen


def laid_out(total: int, shards: int, bounds: Bounds) -> list[Share]:
    """``total`` spread evenly over ``shards`` shards, and each bound's room with it:
    what setting the total or the bounds writes. The total must be within bounds."""
    if not bounds.contains(total):
        raise ValueError(f"total {total} is outside the bounds {bounds.describe()}")
    counts = spread(total, shards)
    ups = spread(bounds.maximum - total, shards) if bounds.maximum is not None else None
    # The largest counts get the smallest downward room, so room is spread evenly too.
    downs = spread(total - bounds.minimum, shards)[::-1] if bounds.minimum is not None else None
    return [
        Share(
            index=i,
            count=counts[i],
            cap=None if ups is None else counts[i] + ups[i],
            floor=None if downs is None else counts[i] - downs[i],
        )
        for i in range(shards)
    ]


def can_ever_fit(delta: int, bounds: Bounds) -> bool:
    """Could ``delta`` be taken by the counter at any total within its bounds?"""
    if bounds.minimum is None or bounds.maximum is None:
        return True
    return abs(delta) <= bounds.maximum - bounds.minimum

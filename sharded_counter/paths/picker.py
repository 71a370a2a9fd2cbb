"""Which shard a write goes to.

Picking uniformly at random lets two writers in one process land on the same
shard, and on an optimistic engine one of them then aborts and retries. A
process knows which shards its own writers hold, so it hands each writer a
shard nobody here is writing (random among the free ones) and falls back to
any shard only when all are busy. Writers in other processes still collide
at random, but no more often than that.

It also keeps this process off the shards of writes whose outcome is unknown
(*reserved*, until the write is resolved): a retry, or whoever resolves the
unsure entry, looks there for the write's token, and a transform write from
this process would overwrite it (see ``store/shards.py``). The same goes for the
shard a fold of delayed_incr landed on, until the fold is settled: if it
outlived its deadline, its resolution looks for the token (see core/stash.py).
The tokens of those writes, and of every write in flight, are *pinned*: a
transaction write of this process keeps them in its token slot on the
shard, where otherwise only the last few survive.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .growth import ShardGrowth
from .registry import PerCounter


class ShardPicker:
    """The shards of one counter that writers in this process are using right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: dict[int, int] = {}  # index -> writers on it
        self._reserved: dict[str, int] = {}  # write token -> its shard, while unsure
        self._kept: set[str] = set()  # those of them kept as unsure entries in delayed_incr
        # reserved tokens delayed_incr no longer names -> monotonic time they go (linger)
        self._lingering: dict[str, float] = {}
        self._in_flight: set[str] = set()  # tokens of writes running now
        # write token -> (shard, transaction, whether its writer still waits on it) of a
        # transform of this process that may still land: sent and not answered, or
        # answered in doubt and not fenced yet.
        self._transforms: dict[str, tuple[int, bytes, bool]] = {}
        #: Set once this process saw a shard of the counter past the transform
        #: limit and could not spread it back: its writes then use transactions.
        self.transforms_unsafe = False
        self._resolve_after = 0.0  # monotonic time before which no resolution is tried
        #: How many shards writes spread over (adaptive sharding: growth.py).
        self.growth = ShardGrowth()

    @contextmanager
    def pick(self, shards: int, prefer: int | None = None) -> Iterator[tuple[int, bool]]:
        """A shard for one write: ``prefer`` when given (even if busy), else a free one.

        Yields the index and whether the write has it to itself: no other writer
        of this process on it, and not reserved. Only such a write may use a
        transform, which overwrites this process's token slot on the shard.
        """
        index = self._take(shards) if prefer is None else self._hold(prefer)
        with self._lock:
            if self._lingering:
                self._purge_lingering()
            alone = self._busy[index] == 1 and index not in self._reserved.values()
        try:
            yield index, alone
        finally:
            with self._lock:
                left = self._busy[index] - 1
                if left:
                    self._busy[index] = left
                else:
                    del self._busy[index]

    def _hold(self, index: int) -> int:
        with self._lock:
            self._busy[index] = self._busy.get(index, 0) + 1
            return index

    def _take(self, shards: int) -> int:
        with self._lock:
            taken = set(self._busy) | set(self._reserved.values())
            index = random.randrange(shards)
            if index in taken and len(taken) < shards:
                # A few random tries find a free shard fast while most are free;
                # past that, scan from a random start.
                for _ in range(4):
                    index = random.randrange(shards)
                    if index not in taken:
                        break
                else:
                    start = random.randrange(shards)
                    index = next(
                        i % shards for i in range(start, start + shards) if i % shards not in taken
                    )
            self._busy[index] = self._busy.get(index, 0) + 1
            return index

    def busy(self) -> set[int]:
        """The shards writers of this process hold right now."""
        with self._lock:
            return set(self._busy)

    # -- transforms that may still land -------------------------------------------

    def transform_claimed(self, token: str, index: int) -> bool:
        """Note the transform write ``token`` to shard ``index`` if its writer still has
        the shard to itself: no other writer of this process holds it (a write, or a
        resolution, which picks its shard too) and no unsure write reserves it. Checked
        and noted at once: a write that picks the shard after this sees the transform
        and waits for it (W12); one that picked it before makes this write a
        transaction (found by the simulator: a resolution and a transform of one
        process on one shard, both replies lost, the transform last)."""
        with self._lock:
            if self._busy.get(index, 0) != 1 or index in self._reserved.values():
                return False
            self._transforms[token] = (index, b"", True)
            return True

    def transform_sent(self, token: str, index: int, transaction: bytes = b"") -> None:
        """A transform write ``token`` of this process goes to shard ``index``, in
        ``transaction`` (noted again once begun). It replaces this process's token slot
        there, so it would drop the tokens of writes of ours that land there before
        it. Its writer waits on it."""
        with self._lock:
            self._transforms[token] = (index, transaction, True)

    def transform_over(self, token: str) -> None:
        """The transform ``token`` was answered, or its transaction fenced: it landed,
        or never will."""
        with self._lock:
            self._transforms.pop(token, None)

    def transform_left(self, token: str) -> None:
        """The writer of the transform ``token`` stopped waiting for it, unfenced (its
        rollbacks went unanswered): whoever next writes its shard fences it first."""
        with self._lock:
            held = self._transforms.get(token)
            if held is not None:
                self._transforms[token] = (held[0], held[1], False)

    def transforms_pending(self, index: int) -> tuple[bool, list[tuple[str, bytes]]]:
        """The transforms of this process that may still land on shard ``index``: whether
        a writer still waits on one, and the (token, transaction) of those left unfenced."""
        with self._lock:
            waited = False
            left = []
            for token, (shard, transaction, waiting) in self._transforms.items():
                if shard == index:
                    waited |= waiting
                    if not waiting:
                        left.append((token, transaction))
        return waited, left

    def transform_left_unfenced(self, token: str) -> bytes | None:
        """The transaction of the transform ``token`` if it was left unfenced."""
        with self._lock:
            held = self._transforms.get(token)
        return held[1] if held is not None and not held[2] else None

    # -- writes whose outcome is unknown ------------------------------------------

    def reserve(self, token: str, index: int) -> None:
        with self._lock:
            self._reserved[token] = index

    def keep(self, token: str) -> None:
        """delayed_incr still names the write ``token`` after it returned: it gave up
        unsure, or its fold outlived its deadline (see core/stash.py). Its token stays
        pinned until this process sees the stash done with it."""
        with self._lock:
            self._kept.add(token)

    def release(self, token: str) -> None:
        with self._lock:
            self._reserved.pop(token, None)
            self._kept.discard(token)
            self._lingering.pop(token, None)

    def linger(self, token: str, seconds: float) -> None:
        """delayed_incr no longer names the kept write ``token``: release it, but only
        ``seconds`` from now (a claim's lifetime). Its entry may have been lost rather
        than resolved (a flush, an eviction, a restart) while another process's
        resolver had claimed it and had yet to look for the token, in our slot on its
        shard: until that claim lapses, the token stays pinned and the shard reserved
        (no transform of ours replaces the slot), so that look finds it."""
        with self._lock:
            if token not in self._kept:
                return
            self._kept.discard(token)
            if token in self._reserved:
                self._lingering.setdefault(token, time.monotonic() + seconds)

    def _purge_lingering(self) -> None:
        """Release the lingering tokens whose time is up (the caller holds the lock)."""
        now = time.monotonic()
        for token in [t for t, until in self._lingering.items() if until <= now]:
            del self._lingering[token]
            self._reserved.pop(token, None)

    @contextmanager
    def writing(self, token: str) -> Iterator[None]:
        """The write ``token`` runs, from taking the stash to settling its fold: its
        token stays pinned (see ``pinned``)."""
        with self._lock:
            self._in_flight.add(token)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight.discard(token)

    def pinned(self) -> frozenset[str]:
        """Tokens a write of this process must keep in its slot: writes in flight, writes
        whose outcome is unknown until they are resolved, and writes delayed_incr still
        names (see ``keep``)."""
        with self._lock:
            if self._lingering:
                self._purge_lingering()
            if not (self._reserved or self._kept):  # the common case: only writes in flight
                return frozenset(self._in_flight)
            return frozenset(self._in_flight.union(self._reserved, self._kept))

    def kept(self) -> set[str]:
        """This process's writes delayed_incr still names, as far as it last saw.

        (Writes still retrying are reserved too, but are not entries yet.)
        """
        if not self._kept:  # the common case, on every write: no lock needed
            return set()
        with self._lock:
            return set(self._kept)

    def resolution_due(self) -> bool:
        """May this process try to resolve unsure writes now? After a failed try it
        waits a while, so callers do not each pay a timeout while Datastore is down."""
        return time.monotonic() >= self._resolve_after

    def resolution_failed(self, pause: float) -> None:
        self._resolve_after = time.monotonic() + pause

    def resolve_now(self) -> None:
        """Lift the wait after a failed try (``repair`` tries at once)."""
        self._resolve_after = 0.0


_pickers: PerCounter[ShardPicker] = PerCounter(ShardPicker)


def picker_for(scope: str, name: str) -> ShardPicker:
    """The process-wide picker of one counter (shared by every Counter object of it)."""
    return _pickers.get((scope, name))

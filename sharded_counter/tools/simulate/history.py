"""What the processes did and were told, and whether the counter kept its promises.

Each operation is an ``Op``: what was asked, when it began and ended (virtual
time; ``end`` None when its process died mid-way) and what its caller heard:

* ``ok``: returned normally (an increment counted: I1, I4);
* ``no``: ``IncrementNotRecorded`` or ``CounterOverflowError`` (never counted: I2),
  or a set's ``CacheUnavailable`` (nothing written);
* ``maybe``: ``IncrementOutcomeUnknown``, a set's ``DatastoreUnavailable``, or a
  process killed mid-call (counted at most once: I3).

``bounds`` says what a read at ``[t0, t1]`` may return, as a Jepsen checker
would of a counter: every increment acknowledged before the read began counts
once; one that may have landed, or overlaps the read, may count; one reported
not recorded never does. A ``count = v`` replaces what landed before it and
adds what lands after (I6); with several sets, each that may have been the last
one before the read is tried. A ``maybe`` write may land up to ``rpc_timeout``
after its caller heard (a late commit). Amounts memcache lost with a stash
(section 5 of docs/protocol.md: not promised) lower the least allowed total;
folds in flight then lose their markers, which sets fence, so what they carry
raises the most allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

INCREMENTS = frozenset({"inc", "keyed", "defer"})


@dataclasses.dataclass
class Op:
    kind: str  # inc, keyed, defer, read, read_nocache, set, flush
    pid: int  # the process (each start of a process is a new one)
    start: float
    delta: int = 0
    key: str = ""
    value: int | None = None  # a set's value; a read's answer
    end: float | None = None
    status: str = "running"  # ok, no, maybe (or running, then killed: maybe)
    error: str = ""

    def __str__(self) -> str:
        end = "killed" if self.end is None else f"{self.end:.4f}"
        what = {"set": f"= {self.value}", "read": f"-> {self.value}"}.get(
            self.kind, f"-> {self.value}" if self.kind == "read_nocache" else f"{self.delta:+d}"
        )
        key = f" key={self.key}" if self.key else ""
        error = f" ({self.error})" if self.error else ""
        return f"p{self.pid} {self.start:.4f}-{end} {self.kind} {what}{key}: {self.status}{error}"


@dataclasses.dataclass
class Loss:
    """What memcache lost with a stash: ``amount`` it held (pending, unsure entries, a
    set's take, folds in flight), each of which may now never count; and ``unfenced``,
    what was in flight to a shard under a marker (folds, unsure writes being
    resolved), which a later set can no longer fence, so it may land after the set
    and count on top of its value."""

    at: float
    amount: int
    unfenced: int
    why: str


@dataclasses.dataclass(frozen=True)
class _Write:
    """An increment as the checker sees it: when its effect may land, and whether it must."""

    start: float
    end: float  # when it certainly had landed, if it did (inf: may land any time)
    delta: int
    must: bool  # acknowledged (counted once for sure)


class History:
    def __init__(self, slack: float) -> None:
        self.ops: list[Op] = []
        self.losses: list[Loss] = []
        self.slack = slack  # how long after its caller heard a maybe write may land
        self._writes: list[_Write] | None = None  # writes(), until an operation ends
        self._writes_of = 0
        self._ended: dict[int, _Write | None] = {}  # by id(op): the writes of ended calls

    def begin(self, op: Op) -> Op:
        self.ops.append(op)
        return op

    def changed(self) -> None:
        """An operation ended: what ``writes`` made of the history is out of date."""
        self._writes = None

    def lost(self, at: float, amount: int, unfenced: int, why: str) -> None:
        if amount or unfenced:
            self.losses.append(Loss(at, amount, unfenced, why))

    # -- the checks ------------------------------------------------------------------------

    def writes(self) -> list[_Write]:
        """The increments, keyed calls of one key merged into one increment: it counts
        once if any call returned, may count if any may have, and never if all were
        refused. Made again only after an operation began or ended."""
        if self._writes is not None and self._writes_of == len(self.ops):
            return self._writes
        found: list[_Write] = []
        keyed: dict[str, list[Op]] = {}
        for op in self.ops:
            if op.kind == "keyed":
                keyed.setdefault(op.key, []).append(op)
            elif op.kind in INCREMENTS:
                if op.status == "running":
                    write = self._write_of([op])
                elif id(op) in self._ended:
                    write = self._ended[id(op)]
                else:  # what an ended call makes of the count is settled: kept
                    write = self._ended[id(op)] = self._write_of([op])
                if write is not None:
                    found.append(write)
        for calls in keyed.values():
            write = self._write_of(calls)
            if write is not None:
                found.append(write)
        self._writes, self._writes_of = found, len(self.ops)
        return found

    def _write_of(self, calls: list[Op]) -> _Write | None:
        start = min(c.start for c in calls)
        acked = [c.end for c in calls if c.status == "ok" and c.end is not None]
        if acked:
            return _Write(start, min(acked), calls[0].delta, True)
        doubtful = [c for c in calls if c.status in ("maybe", "running")]
        if not doubtful:
            return None
        ends = [math.inf if c.end is None else c.end + self.slack for c in doubtful]
        return _Write(start, max(ends), calls[0].delta, False)

    def bounds(self, t0: float, t1: float) -> tuple[int, int]:
        """The least and the most a read that ran from ``t0`` to ``t1`` may return."""
        writes = self.writes()
        sets = [o for o in self.ops if o.kind == "set" and o.status in ("ok", "maybe", "running")]
        sets = [s for s in sets if s.start < t1]
        done = [s for s in sets if s.status == "ok" and s.end is not None and s.end < t0]
        lows, highs = [], []
        candidates: list[Op | None] = [None, *sets]
        for cand in candidates:
            s0, s1 = (-math.inf, -math.inf) if cand is None else (cand.start, _end(cand))
            # A set that surely came after this candidate and before the read hides it.
            if any(d.start > s1 for d in done) or (cand is None and done):
                continue
            value = 0 if cand is None or cand.value is None else cand.value
            low = high = value
            for w in writes:
                if w.end < s0 or w.start >= t1:
                    continue  # replaced by the candidate set, or begun after the read
                if w.must and w.start > s1 and w.end < t0:
                    low += w.delta
                    high += w.delta
                elif w.delta > 0:
                    high += w.delta
                else:
                    low += w.delta
            lows.append(low)
            highs.append(high)
        lost = [loss for loss in self.losses if loss.at < t1]
        return min(lows) - sum(x.amount for x in lost), max(highs) + sum(x.unfenced for x in lost)

    def check_read(self, op: Op, slack: tuple[int, int] = (0, 0)) -> str | None:
        """Why the read ``op`` broke a promise, or None. ``slack``: how far below and
        above the history's bounds the read may stray (docs/protocol.md, section 5:
        a read during a fold, while memcache fails, or before unsure writes are
        resolved)."""
        # A cached read is not checked here: its record may lag a write or a set whose
        # merge memcache refused (section 5), so its total may be any the counter had
        # lately. What it must keep, each shard's state one the shard had, is I7.
        if op.kind != "read_nocache" or op.value is None or op.end is None:
            return None
        low, high = self.bounds(op.start, op.end)
        low, high = low - slack[0], high + slack[1]
        if not low <= op.value <= high:
            return f"a read from Datastore returned {op.value}, outside [{low}, {high}]: {op}"
        return None


def _end(op: Op) -> float:
    return math.inf if op.end is None else op.end


def describe(ops: Iterable[Op]) -> str:
    return "\n".join(str(op) for op in ops)

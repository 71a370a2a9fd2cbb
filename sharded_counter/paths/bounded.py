"""A bounded increment, from its shard's share to its answer.

::

    the counter laid out as bounded? (once per process; core/escrow.laid_out)
    -> one transaction on a shard: fits its share?  yes: written
    -> short: read every share in one snapshot; the pool short too?  LimitReached
    -> else one transaction over the shard and lenders picked at random
       (core/escrow.donors): pool, add, deal out; short again (others spent
       it meanwhile): snapshot again
    -> retried under the write policy until ``retry_deadline``; the ending
       decides the answer by core/outcomes.BOUNDED

A bounded increment is never kept in memcache: a stash is spent without a
look at the shares, so it could carry the total past a bound. When Datastore
fails the caller gets ``IncrementNotRecorded`` or ``IncrementOutcomeUnknown``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator

from google.api_core import exceptions as gexc

from ..core import escrow, outcomes
from ..core.effects import Steps, done
from ..core.escrow import Bounds, Share
from ..core.outcomes import Ending, Step
from ..core.record import ShardState
from ..core.tokens import new_token
from ..errors import (
    CounterOverflowError,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
    LimitReached,
)
from ..store.escrow import EscrowStore, FieldOverflow, OutOfBounds, Short, Stored
from ..store.retry import write_retrying
from .context import CounterContext
from .leased import leased_lenders, leased_shard
from .registry import PerCounter
from .shard_writes import ShardWriter, ending_of

log = logging.getLogger("sharded_counter")


class _Turns:
    """Shard writes of one bounded counter in this process take turns with its borrows.

    Writes of one shard each (many at once, on different shards: the picker sees
    to that) share; a borrow, which reads and writes shards other writers may
    hold, runs alone. On the pessimistic engine two transactions that read one
    shard and then both write it each wait for the other's lock until a lock
    timeout (2 s on the emulator); borrows are rare, so pausing a process's
    writes for one costs little. Writers that wait for a borrow go first after it.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._sharing = 0
        self._borrowing = False
        self._borrowers_waiting = 0

    @contextlib.contextmanager
    def share(self) -> Iterator[None]:
        with self._lock:
            while self._borrowing or self._borrowers_waiting:
                self._lock.wait()
            self._sharing += 1
        try:
            yield
        finally:
            with self._lock:
                self._sharing -= 1
                self._lock.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._lock:
            self._borrowers_waiting += 1
            while self._borrowing or self._sharing:
                self._lock.wait()
            self._borrowers_waiting -= 1
            self._borrowing = True
        try:
            yield
        finally:
            with self._lock:
                self._borrowing = False
                self._lock.notify_all()


class _Known:
    """What this process knows of one bounded counter's stored bounds (per backend: a
    test may point one process at two emulators)."""

    def __init__(self) -> None:
        self.stored: Stored | None = None


_known: PerCounter[_Known] = PerCounter(_Known)
# Per counter, like the picker: every writer of it in this process takes turns,
# whichever client objects it was made with.
_turns: PerCounter[_Turns] = PerCounter(_Turns)


class BoundedWrites:
    """The increments, sets and bound changes of one bounded counter in this process."""

    def __init__(self, ctx: CounterContext, bounds: Bounds) -> None:
        self.ctx = ctx
        self.bounds = bounds  # what this object asks for when it lays the counter out
        self.store = EscrowStore(ctx.backend.store, ctx.backend.keyed)
        self.shards = ShardWriter(ctx)  # for its tally of failed attempts
        self._known = _known.get((id(ctx.backend), ctx.backend.store.scope, ctx.name))
        self._turns = _turns.get((ctx.backend.store.scope, ctx.name))
        self._told = False  # about bounds in Datastore other than this object's

    # -- laying out -------------------------------------------------------------------

    def stored(self) -> Stored:
        """The counter's bounds and shard count as Datastore holds them; lays it out with
        this object's bounds on first use. Raises ``LimitReached`` (nothing written)
        when its total, as a plain counter, is outside those bounds.

        Datastore's bounds win over this object's: they may have been changed since
        (``set_bounds``, the CLI) by a process that knew better. A difference is
        logged once per object, and ``self.bounds`` follows what is stored.
        """
        known = self._known.stored
        if known is None:
            known = self._lay_out(only_if_new=True)
        self._follow(known)
        return known

    def stored_for_increment(self, delta: int) -> Stored:
        """``stored()`` ahead of an increment of ``delta``. Datastore failing to give
        (or lay out) the bounds fails the increment before any write of it was sent,
        so it is certainly not counted: ``IncrementNotRecorded``."""
        try:
            return self.stored()
        except gexc.GoogleAPICallError as exc:
            raise IncrementNotRecorded(self.ctx.name, delta, exc) from exc

    def _follow(self, stored: Stored) -> None:
        if stored.bounds != self.bounds:
            if not self._told:
                log.warning(
                    "bounded counter %r has the bounds %s in Datastore, not %s as this "
                    "object was made with; the stored ones hold (change them with set_bounds)",
                    self.ctx.name,
                    stored.bounds.describe(),
                    self.bounds.describe(),
                )
                self._told = True
            self.bounds = stored.bounds

    def _lay_out(
        self,
        *,
        bounds: Bounds | None = None,
        shards: int | None = None,
        value: int | None = None,
        only_if_new: bool = False,
        keep_stored: bool = False,
    ) -> Stored:
        ctx = self.ctx
        wanted = self.bounds if bounds is None else bounds
        try:
            stored, states = write_retrying(ctx.settings, until_deadline=True)(
                self.store.lay_out,
                ctx.name,
                ctx.shards if shards is None else shards,
                wanted,
                value=value,
                lazy_begin=ctx.backend.lazy_begin,
                only_if_new=only_if_new,
                keep_stored=keep_stored,
            )
        except OutOfBounds as exc:
            known = self._known.stored or Stored(wanted, ctx.shards)
            raise LimitReached(ctx.name, exc.total, known.bounds, setting=True) from None
        except FieldOverflow:
            raise CounterOverflowError(
                f"counter {ctx.name!r}: a shard's share of the bounds {wanted.describe()} "
                "would leave the signed 64-bit range; nothing was written"
            ) from None
        self._known.stored = stored
        if states:
            ctx.backend.cache.merge(ctx.record_key, ctx.stash_key, states)
        return stored

    def set_bounds(self, bounds: Bounds, shards: int | None) -> Stored:
        """New bounds (and shard count: by default the stored one), the total kept: one
        transaction over every shard."""
        if shards is None:
            known = self.store.stored(self.ctx.name)
            shards = self.ctx.shards if known is None else known.shards
        stored = self._lay_out(bounds=bounds, shards=shards)
        self.bounds = bounds
        return stored

    def set_total(self, value: int) -> None:
        """Set the total to ``value``, every share dealt out again: one transaction."""
        stored = self.stored()
        if not stored.bounds.contains(value):
            raise LimitReached(self.ctx.name, value, stored.bounds, setting=True)
        self._lay_out(shards=stored.shards, value=value, keep_stored=True)

    def forget(self) -> None:
        self.store.forget(self.ctx.name)
        self._known.stored = None

    # -- increments -------------------------------------------------------------------

    def apply(self, delta: int, key: str | None = None) -> None:
        """Add ``delta`` within the bounds (see the module docstring), or raise
        ``LimitReached``, ``IncrementNotRecorded``, ``IncrementOutcomeUnknown`` or
        ``CounterOverflowError``. With ``key``, its record goes in the same transaction."""
        ctx = self.ctx
        stored = self.stored_for_increment(delta)
        if not escrow.can_ever_fit(delta, stored.bounds):
            raise LimitReached(ctx.name, delta, stored.bounds)
        token = "" if key is not None else new_token()
        record = None if key is None else (key, ctx.settings.idempotency_ttl)
        unsure_of: int | None = None  # the shard an attempt of unknown outcome went to
        deadline = time.monotonic() + ctx.settings.retry_deadline

        def attempt() -> list[ShardState | None]:
            nonlocal unsure_of
            index = None
            shards = self.stored().shards  # laid out again meanwhile? then as it is now

            def write_there(there: int, _alone: bool) -> Steps[list[ShardState | None]]:
                nonlocal index
                index = there
                return done(self._write(there, delta, shards, token, record, deadline))

            try:
                # Still blocking inside: bounded writes are not steps yet.
                return ctx.run(leased_shard(ctx, shards, write_there, prefer=unsure_of))
            except gexc.AlreadyExists:
                return [None]  # the key's record was inserted meanwhile: it is applied
            except gexc.GoogleAPICallError as exc:
                if self.shards.attempt_failed(exc) and unsure_of is None and index is not None:
                    unsure_of = index  # retry there: the token or key is looked for first
                raise

        # A keyed write names itself by its key, not a token: nothing to pin then.
        with ctx.picker.writing(token) if token else contextlib.nullcontext():
            try:
                states = write_retrying(ctx.settings, until_deadline=True)(attempt)
            except Exception as exc:
                failure = self._failure(exc, delta, unsure_of is not None)
                if failure is exc:
                    raise
                # The backend's error stays the cause, as docs/using.md promises.
                raise failure from exc
        written = [s for s in states if s is not None]
        if written:
            ctx.stats.add(writes=1)
            ctx.backend.cache.merge(ctx.record_key, ctx.stash_key, written)
        if unsure_of is not None:
            # An attempt whose reply was lost may have landed on a shard the cached
            # record never heard of (the retry found it and wrote nothing): rebuild it.
            ctx.backend.cache.invalidate(ctx.record_key)

    def _write(
        self,
        index: int,
        delta: int,
        shards: int,
        token: str,
        record: tuple[str, float] | None,
        deadline: float,
    ) -> list[ShardState | None]:
        """One attempt: the shard's own share, else borrow; raises LimitReached when every
        share together lacks the room."""
        ctx = self.ctx
        turns = self._turns
        # ``write(lenders)``: the taker alone when there are none, else a borrow.
        write = functools.partial(
            self.store.borrow,
            ctx.name,
            index,
            delta=delta,
            lazy_begin=ctx.backend.lazy_begin,
            token=token,
            pinned=ctx.picker.pinned(),
            key=record,
        )
        try:
            with turns.share():
                return write([])
        except Short:
            pass
        while True:
            stored, shares = self.store.snapshot(ctx.name, shards)
            if stored is None or stored != self._known.stored:
                # Deleted, or laid out again (other bounds, other shards) by another
                # process meanwhile: learn it, and start over with what is stored now.
                self._known.stored = None
                self.stored()
                raise gexc.Aborted("the bounded counter was laid out again meanwhile")  # type: ignore[no-untyped-call]
            # Lenders no other writer is holding, here or (by lease) elsewhere: on the
            # pessimistic engine two transactions that read and write one shard wait
            # on each other's locks.
            choose = functools.partial(_lenders, shares, index, delta)

            def borrow(
                lenders: list[int] | None, bounds: Bounds = stored.bounds
            ) -> Steps[list[ShardState | None] | None]:
                if lenders is None:
                    raise LimitReached(ctx.name, delta, bounds)
                try:
                    with turns.alone():
                        return done(write(lenders))
                except Short:
                    # Others spent the room this snapshot saw: look again, within the deadline.
                    if time.monotonic() > deadline:
                        raise gexc.Aborted("the bounded counter's room kept moving") from None  # type: ignore[no-untyped-call]
                    return done(None)

            result = ctx.run(leased_lenders(ctx, choose, borrow))
            if result is None:
                continue
            ctx.stats.add(borrows=1)
            return result

    def _failure(self, exc: Exception, delta: int, doubtful: bool) -> BaseException:
        """The error for an increment whose attempts ended with ``exc``."""
        ctx = self.ctx
        if doubtful:
            # Even a refusal: the attempt whose reply was lost may land after it.
            ctx.backend.cache.invalidate(ctx.record_key)
            step = outcomes.BOUNDED[Ending.DOUBTFUL]
        elif isinstance(exc, LimitReached):
            return exc
        elif isinstance(exc, FieldOverflow):
            return CounterOverflowError(
                f"counter {ctx.name!r} cannot take {delta}: a shard's count or share would "
                "leave the signed 64-bit range; nothing was written"
            )
        elif isinstance(exc, gexc.GoogleAPICallError):
            step = outcomes.BOUNDED[ending_of(exc)]
        else:
            return exc
        if step is Step.OUTCOME_UNKNOWN:
            return IncrementOutcomeUnknown(ctx.name, delta, exc)
        assert step is Step.NOT_RECORDED, step
        return IncrementNotRecorded(ctx.name, delta, exc)


def _lenders(shares: list[Share], taker: int, delta: int, avoid: set[int]) -> list[int] | None:
    return escrow.donors(shares, taker, delta, avoid=avoid - {taker})

"""``BoundedCounter``: a ``Counter`` whose total never leaves ``[minimum, maximum]``.

::

    increment(n), try_increment(n)  -> paths/combiner.py (same-sign groups)
                                    -> paths/bounded.py: the shard's share, else borrow,
                                       else LimitReached (core/escrow.py decides)
    count = v, set_bounds(...)      -> paths/bounded.py: one transaction over every shard
    count, get_count, verify        -> as for Counter (paths/reads.py)
"""

from __future__ import annotations

import time
from typing import Any

from google.cloud import datastore

from .cache.client import MemcacheClient
from .core.escrow import Bounds, can_ever_fit
from .core.validation import check_delta, check_idempotency_key, fits_int64
from .counter import Counter
from .errors import IncrementOutcomeUnknown, LimitReached
from .paths.bounded import BoundedWrites
from .paths.context import TRANSFORM_MAX_DELTA
from .process import PerProcess
from .store.retry import datastore_failures_as_ours
from .telemetry import telemetry

__all__ = ["BoundedCounter", "check_bounds"]


class BoundedCounter(Counter):
    """A sharded counter whose total stays within ``[minimum, maximum]``.

    Either bound may be None (no bound on that side); both may also be class
    attributes, like ``shards``. Each shard holds a share of the room to each
    bound (escrow, see ``core/escrow.py``): an increment writes one shard, as
    for ``Counter``, and borrows room from other shards when its own share is
    short; it is refused with ``LimitReached`` only when all of the shards
    together lack the room. memcache caches the total as for ``Counter``, but is
    never asked whether an increment fits, and nothing is ever stashed there.

    The counter is *laid out* (its bounds written to Datastore, the room dealt
    to its shards) by the first call that needs it. A counter of the same name
    that was written as a plain ``Counter`` becomes bounded then, if its total
    is within the bounds. Once laid out, the bounds and shard count in
    Datastore win over the ones an object is made with (a difference is logged
    once): ``set_bounds`` changes them, for every process at once. A plain ``Counter``
    of the same name then refuses to write it (``CounterIsBounded``): its writes
    do not spend the shares, so the bounds would no longer hold.
    """

    # Its shares are dealt over the shards it was laid out with: they do not grow.
    _grows_shards = False

    minimum: int | None = None
    maximum: int | None = None
    #: Fewer writes in flight than ``Counter``'s 4: a bounded write is a transaction
    #: (three round trips on Firestore, two on the classic engine, against a plain
    #: write's one), so fewer, larger groups carry more increments per second. At 16
    #: threads, 2 made 0.68-0.72x the plain Counter on Firestore against 0.45-0.51x
    #: with 4, and 1.33x against 0.92x on the classic engine. A keyword argument or a
    #: subclass sets another (as a class attribute, it wins over the config's value).
    max_concurrent_writes: int = 2

    def __init__(
        self,
        name: str,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
        datastore_client: datastore.Client | None = None,
        memcache_client: MemcacheClient | None = None,
        **options: Any,
    ) -> None:
        cls = type(self)
        bounds = check_bounds(
            cls.minimum if minimum is None else minimum,
            cls.maximum if maximum is None else maximum,
        )
        super().__init__(
            name, datastore_client=datastore_client, memcache_client=memcache_client, **options
        )
        self.minimum = bounds.minimum
        self.maximum = bounds.maximum
        # This process's view of the stored bounds and shares, on this process's paths.
        self._bounded_here = PerProcess(lambda: BoundedWrites(self._ctx, bounds))

    @property
    def _bounded(self) -> BoundedWrites:
        return self._bounded_here.get()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, minimum={self.minimum}, "
            f"maximum={self.maximum}, shards={self.shards})"
        )

    # -- writing ----------------------------------------------------------------

    def increment(
        self,
        delta: int = 1,
        *,
        transaction: datastore.Transaction | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        """Add ``delta`` (negative to release), keeping the total within the bounds.

        Returns once the increment is written to a shard. Raises:

        * ``LimitReached``: the total would leave the bounds; nothing written.
        * ``IncrementNotRecorded``: certainly not counted; retrying is safe.
        * ``IncrementOutcomeUnknown``: maybe counted (a write whose reply was
          lost); retry only with an idempotency key.
        * ``CounterOverflowError``: a shard's count or share would leave the
          signed 64-bit range; nothing written.
        * ``TypeError`` / ``ValueError``: bad input (or ``transaction``, which a
          bounded counter cannot join); nothing written.

        ``idempotency_key`` works as for ``Counter.increment``. Attempts are
        retried until ``retry_deadline``: near a bound, writers contend for the
        last of the room.
        """
        delta = check_delta(delta)
        key = None if idempotency_key is None else check_idempotency_key(idempotency_key)
        if transaction is not None:
            raise ValueError(
                "a BoundedCounter cannot join a caller's transaction: its increment must "
                "read and may rewrite shards the caller's transaction would hold"
            )
        bounds = self._bounded.bounds
        if not can_ever_fit(delta, bounds):
            raise ValueError(
                f"an increment of {delta} can never fit counter {self.name!r}, whose "
                f"bounds {bounds.describe()} span less than that"
            )
        started = time.perf_counter()
        outcome = "not_recorded"
        try:
            self._bounded_increment(delta, key)
            outcome = "written"
        except IncrementOutcomeUnknown:
            outcome = "outcome_unknown"
            raise
        except LimitReached:
            outcome = "limit_reached"
            raise
        finally:
            telemetry().increment_done(outcome, time.perf_counter() - started)

    def _bounded_increment(self, delta: int, key: str | None) -> None:
        if not delta:
            self._bounded.stored_for_increment(delta)  # still checks the bounds agree
            return
        if key is not None:
            self._bounded.apply(delta, key)
            return
        # Increments of one sign share a write; the combiner reruns alone each member
        # of a group whose sum was refused, so each gets its own answer.
        self._ctx.combiner.run(
            delta,
            self._bounded.apply,
            limit=self.settings.max_concurrent_writes,
            eager=not self.settings.group_commit,
            max_total=TRANSFORM_MAX_DELTA,
            same_sign=True,
        )

    def try_increment(self, delta: int = 1, *, idempotency_key: str | None = None) -> bool:
        """``increment``, returning False instead of raising ``LimitReached``."""
        try:
            self.increment(delta, idempotency_key=idempotency_key)
        except LimitReached:
            return False
        return True

    def defer(self, delta: int = 1) -> bool:
        """Not for a bounded counter: an amount kept in memcache is written later
        without a look at the bounds. Raises TypeError."""
        raise TypeError(
            "a BoundedCounter cannot defer increments to memcache (SharedBuffer): "
            "they would be written without a look at its bounds"
        )

    def write_pending(self) -> None:
        """Not for a bounded counter, which never has increments pending in memcache.
        Raises TypeError."""
        raise TypeError("a BoundedCounter has no increments pending in memcache to write")

    # -- reading ---------------------------------------------------------------------

    @datastore_failures_as_ours
    def get_count(self, nocache: bool = False) -> int:
        """The total, as ``Counter.get_count`` reads it, never outside the bounds.

        Every state the shards pass through is within the bounds, but a cached
        total merges each shard's latest write as it arrives, so for a moment it
        may add one shard's newer count to another's older one (as any cached
        total may lag, see ``Counter``). Such a total, if it is outside the bounds
        read from Datastore now, is stale for certain, and is given as the bound
        it passed.
        """
        total = super().get_count(nocache=nocache)
        if self._bounded.bounds.contains(total):
            return total
        stored = self._bounded.store.stored(self.name)
        if stored is None:
            return total  # not laid out (deleted meanwhile): a plain counter's total
        return stored.bounds.clamp(total)

    # -- setting ---------------------------------------------------------------------

    @datastore_failures_as_ours
    def set_count(self, value: int) -> None:
        """Set the total to ``value``, which must be within the bounds (else
        ``LimitReached``, nothing written): one transaction over every shard, which
        deals each bound's room out again. Increments land wholly before or after it."""
        value = check_delta(value)
        with self._ctx.combiner.exclusive():
            self._bounded.set_total(value)

    @datastore_failures_as_ours
    def set_bounds(
        self,
        minimum: int | None = None,
        maximum: int | None = None,
        *,
        shards: int | None = None,
    ) -> None:
        """Give the counter new bounds (a plan upgrade, say), keeping its total, in one
        transaction over every shard: increments land wholly before or after it, and
        every process's writes follow the new shares at once.

        Raises ``LimitReached`` (nothing written) when the total is outside the new
        bounds. ``shards`` changes the shard count too (default: the one in
        Datastore, else this object's). Every process's
        objects of the counter follow the new bounds from their next write on.
        """
        bounds = check_bounds(minimum, maximum)
        if shards is not None:
            shards = _check_shards(shards)
        with self._ctx.combiner.exclusive():
            known = self._bounded.set_bounds(bounds, shards)
        self.minimum, self.maximum = bounds.minimum, bounds.maximum
        self.shards = known.shards

    @datastore_failures_as_ours
    def bounds_in_datastore(self) -> tuple[Bounds, int] | None:
        """The bounds and shard count Datastore holds for this counter (None: never laid
        out as bounded), read now."""
        stored = self._bounded.store.stored(self.name)
        return None if stored is None else (stored.bounds, stored.shards)

    @datastore_failures_as_ours
    def shares(self) -> list[tuple[int, int, int | None, int | None]]:
        """Each shard's ``(index, count, room up, room down)`` as of one consistent read
        (room None: no bound on that side). For operators: the CLI shows it."""
        stored = self._bounded.stored()
        _, shares = self._bounded.store.snapshot(self.name, stored.shards)
        return [(s.index, s.count, s.room(True), s.room(False)) for s in shares]

    @datastore_failures_as_ours
    def delete(self) -> int:
        """Delete every shard, the cached total and the stored bounds; the next call lays
        the counter out afresh. Returns the number of shards deleted."""
        removed = super().delete()
        self._bounded.forget()
        return removed


def check_bounds(minimum: Any, maximum: Any) -> Bounds:
    """Bounds from what a caller gave, or TypeError/ValueError (before anything is written)."""
    for what, bound in (("minimum", minimum), ("maximum", maximum)):
        if bound is None:
            continue
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise TypeError(f"{what} must be an int or None, not {type(bound).__name__}")
        if not fits_int64(bound):
            raise ValueError(f"{what} {bound} is outside the signed 64-bit range")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise ValueError(f"minimum {minimum} is greater than maximum {maximum}")
    return Bounds(minimum, maximum)


def _check_shards(shards: Any) -> int:
    if isinstance(shards, bool) or not isinstance(shards, int):
        raise TypeError(f"shards must be an int, not {type(shards).__name__}")
    if not 1 <= shards <= 400:
        raise ValueError(f"a bounded counter has 1 to 400 shards, not {shards}")
    return shards

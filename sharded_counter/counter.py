"""``Counter``: the public face of a sharded counter, and nothing else.

::

    increment(n)          -> paths/combiner.py: alone, or in a group behind writes in flight
                          -> paths/writes.py: fold delayed_incr, write a shard, then the
                             step core/outcomes.py names (acknowledge, stash, keep unsure)
    increment(n, key=k)   -> paths/keyed.py: the shard and k's record in one commit
    count                 -> paths/reads.py: a complete cached record + what delayed_incr
                             owes, else the sum of the shards, cached safely
    count = v             -> paths/sets.py: one transaction over every shard
    verify(), repair()    -> paths/reads.py, paths/unsure.py, paths/writes.py

Each path works on one ``CounterContext`` (paths/context.py); the decisions are
in ``core/``, the calls in ``store/`` and ``cache/``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import datastore

from .cache.client import MemcacheClient
from .core.outcomes import Step
from .core.validation import check_delta, check_idempotency_key
from .errors import CacheUnavailable, IncrementNotRecorded, IncrementOutcomeUnknown
from .paths.backend import Backend
from .paths.bounds_guard import refuse_if_bounded
from .paths.context import TRANSFORM_MAX_DELTA
from .paths.reads import Verification, read_many
from .paths.stats import WriteStats
from .paths.wiring import OUTCOME_OF_STEP, CounterFacade, ShardsOption, class_options
from .paths.writes import stash_or_raise
from .store.joined import check_transaction, stage_increment
from .store.keyed import MAX_KEYS_PER_WRITE
from .store.retry import datastore_failures_as_ours
from .telemetry import telemetry

__all__ = ["OUTCOME_OF_STEP", "Counter", "ShardsOption", "Verification", "class_options"]


class Counter(CounterFacade):
    """A counter spread over ``shards`` Datastore entities, with its total cached in memcache.

    ``Counter('hits')`` connects from the environment; keyword arguments override
    any option of ``Settings`` (see ``sharded_counter.settings``), and
    ``datastore_client`` / ``memcache_client`` take clients you made yourself.
    """

    shards: int = ShardsOption()  # type: ignore[assignment]  # read as an int, see ShardsOption
    """The number of shards new increments are spread over.

    On ``Counter`` (or a subclass that does not set it) the count the settings give
    (10 by default); a subclass sets its own with ``shards = 20``; on a counter, the
    count in force (a keyword argument wins).
    """

    def __init__(
        self,
        name: str,
        *,
        datastore_client: datastore.Client | None = None,
        memcache_client: MemcacheClient | None = None,
        **options: Any,
    ) -> None:
        # Connected on the first call in each process (and after reconnect()): making a
        # counter opens nothing, and one made before a fork uses the child's own clients.
        super().__init__(name, options, datastore_client, memcache_client)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shards={self.shards})"

    @property
    def shards_in_use(self) -> int:
        """How many shards this process spreads new increments over now: ``shards``, or
        more while its writes meet contention, up to ``max_shards`` (see *Adaptive
        sharding* in the docs). Reads sum every shard, whatever count wrote it."""
        return self._ctx.shards

    @property
    def shard_count(self) -> int:
        """Deprecated alias of ``shards`` (the count in force on this counter)."""
        warnings.warn(
            "Counter.shard_count is deprecated; read Counter.shards",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.shards

    @property
    @datastore_failures_as_ours
    def write_mode(self) -> str:
        """ "transform" (one commit, no read) or "transaction" (read, add, write).

        The first look in a process may ask Datastore which engine it is: raises
        ``DatastoreUnavailable`` when that fails."""
        return self._ctx.backend.write_mode

    @property
    def stats(self) -> WriteStats:
        """What this counter object's writes did (for the demo, the bench and logs)."""
        return self._ctx.stats

    # What tests and the tools look at; not part of the API.
    @property
    def _backend(self) -> Backend:
        return self._ctx.backend

    @property
    def _record_key(self) -> str:
        return self._ctx.record_key

    @property
    def _stash_key(self) -> str:
        return self._ctx.stash_key

    def _pending_stash(self) -> int:
        paths = self._paths
        return paths.ctx.run(paths.reader.pending())

    def _stash_or_raise(self, amount: int, cause: BaseException) -> None:
        # For CounterBuffer: keep an amount that certainly never landed in delayed_incr.
        self._ctx.run(stash_or_raise(self._ctx, amount, cause))

    # -- writing ----------------------------------------------------------------

    def increment(
        self,
        delta: int = 1,
        *,
        transaction: datastore.Transaction | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        """Add ``delta`` (any int64, negative to decrement) to the counter.

        Returns once the increment is counted: its shard write committed, or
        the write kept failing and the delta is stashed in ``delayed_incr`` (or
        kept there as an unsure entry, when the write may have landed) for a
        later write to add exactly once. Raises:

        * ``IncrementNotRecorded``: certainly not counted, nothing kept;
          retrying is safe.
        * ``IncrementOutcomeUnknown``: maybe counted (a write that may have
          landed, with memcache unable to keep it); retry only with an
          idempotency key.
        * ``CounterOverflowError``: no shard can take it; nothing written.
        * ``TypeError`` / ``ValueError``: bad input; nothing written.

        With ``idempotency_key`` (a non-empty str of at most 1,500 UTF-8 bytes)
        the first call with that key on this counter counts ``delta``, and every
        later one, from any thread or process, counts nothing and returns
        normally, for at least ``idempotency_ttl`` seconds (store/keyed.py). A
        keyed increment is never stashed: when Datastore fails it raises one of
        the two errors above, and retrying with the same key is always safe.

        With ``transaction`` (a ``google.cloud.datastore.Transaction`` in
        progress) the increment joins it instead: it is written by that
        transaction's commit, with the caller's other writes, or not at all,
        and nothing is retried or stashed here; the cache is updated after the
        commit succeeds. A key given with it is checked and recorded inside
        that transaction.
        """
        delta = check_delta(delta)
        key = None if idempotency_key is None else check_idempotency_key(idempotency_key)
        refuse_if_bounded(self._ctx)  # a BoundedCounter's name: CounterIsBounded
        if transaction is not None:
            # Staged only: the caller's commit decides, so no outcome is recorded here.
            self._increment_joined(delta, transaction, key)
            return
        started = time.perf_counter()
        outcome = "not_recorded"
        try:
            outcome = OUTCOME_OF_STEP[self._increment_now(delta, key)]
        except IncrementOutcomeUnknown:
            outcome = "outcome_unknown"
            raise
        finally:
            telemetry().increment_done(outcome, time.perf_counter() - started)

    def _increment_now(self, delta: int, key: str | None) -> Step:
        """Write ``delta`` (grouped with other threads' increments); how it was counted."""
        combiner, limit = self._ctx.combiner, self.settings.max_concurrent_writes
        eager = not self.settings.group_commit
        if key is not None:
            combiner.run_keyed(
                key,
                delta,
                self._write_keyed,
                limit=limit,
                eager=eager,
                max_total=TRANSFORM_MAX_DELTA,
                max_keys=MAX_KEYS_PER_WRITE,
            )
            return Step.ACKNOWLEDGE  # a keyed increment is written or raises
        if not delta:
            return Step.ACKNOWLEDGE
        step = combiner.run(
            delta, self._write, limit=limit, max_total=TRANSFORM_MAX_DELTA, eager=eager
        )
        return Step.ACKNOWLEDGE if step is None else step  # None: deltas cancelled out

    def _write(self, amount: int) -> Step:
        paths = self._paths
        return paths.ctx.run(paths.writes.apply(amount))

    def _write_keyed(self, keys: dict[str, int]) -> Mapping[str, BaseException]:
        paths = self._paths
        return paths.ctx.run(paths.keyed.write(keys))

    def _increment_joined(
        self, delta: int, transaction: datastore.Transaction, key: str | None
    ) -> None:
        ctx = self._ctx
        store, cache = ctx.backend.store, ctx.backend.cache
        check_transaction(transaction, store.client.project)
        try:
            stage_increment(
                transaction,
                name=self.name,
                shards=self.shards,
                namespace=store.client.namespace,
                delta=delta,
                after_commit=lambda: cache.invalidate(ctx.record_key),
                idempotency_key=key,
                key_ttl=self.settings.idempotency_ttl,
                timeout=self.settings.rpc_timeout,
            )
        except gexc.GoogleAPICallError as exc:
            # A read in the caller's transaction failed: nothing was staged.
            raise IncrementNotRecorded(self.name, delta, exc) from exc

    # -- writing later: the shared write buffer -------------------------------------

    def defer(self, delta: int = 1) -> bool:
        """Count ``delta`` in memcache only, for ``write_pending`` to write to a shard later.

        It goes into the counter's ``delayed_incr`` stash, as an increment whose
        write failed would: reads count it at once, and any later write (or
        ``write_pending``) folds it into a shard, exactly once
        (docs/protocol.md). One memcache ``gets`` and ``cas``; no Datastore call.
        This is what ``SharedBuffer.increment`` does. Returns whether nothing was
        pending before (the counter now needs a flush).

        Raises ``CacheUnavailable`` (not kept: memcache is down, refused it or is
        not configured), ``CounterOverflowError`` (not kept: the pending amount
        would leave the signed 64-bit range, which no one write can carry) or
        ``IncrementOutcomeUnknown`` (memcache may have kept it: its reply was
        lost). Until it is written, ``delta`` shares the stash's loss window:
        memcache losing the key loses it.
        """
        delta = check_delta(delta)
        ctx = self._ctx
        if not ctx.backend.cache.enabled:
            raise CacheUnavailable("no memcached servers are configured (set MEMCACHED_HOSTS)")
        try:
            before = ctx.backend.cache.stash(ctx.stash_key, delta, within_int64=True)
        except CacheUnavailable as exc:
            if exc.maybe_applied:
                raise IncrementOutcomeUnknown(self.name, delta, exc) from exc
            raise
        return before == 0

    @datastore_failures_as_ours
    def write_pending(self) -> None:
        """Write what ``delayed_incr`` holds for this counter to a shard now, in one write.

        First resolves unsure writes there (a flusher that died mid-write leaves
        one), then folds the pending amount into one shard write with the usual
        marker and token, so a writer that dies mid-way loses nothing and counts
        nothing twice. Raises ``DatastoreUnavailable`` when the write fails (the
        amount stays pending). With memcache down it writes nothing: the amount
        waits in memcache.
        """
        paths = self._paths
        paths.ctx.run(paths.resolver.resolve(look=True))
        paths.ctx.run(paths.writes.fold_pending())

    # -- reading ----------------------------------------------------------------

    @datastore_failures_as_ours
    def get_count(self, nocache: bool = False) -> int:
        """The counter's total.

        From the cached record when one is complete; otherwise (or with
        ``nocache=True``) the sum of every ``CounterShard`` with this name, plus
        what ``delayed_incr`` holds: increments still pending, and writes whose
        outcome is unknown (a read first tries to resolve those, see ``core/stash.py``).
        """
        paths = self._paths
        if nocache:
            return paths.ctx.run(paths.reader.total(nocache=True))
        return paths.reader.total_here()

    @classmethod
    @datastore_failures_as_ours
    def get_counts(
        cls, names: Iterable[str], *, nocache: bool = False, **options: Any
    ) -> dict[str, int]:
        """Totals of many counters of this class at once, by name.

        One memcache ``get_many`` for all of them, then one Datastore read
        for all the misses (one query per 30 names on Firestore in Datastore
        mode; side-by-side queries per name on the classic emulator, which
        refuses IN filters). Misses are cached as ``get_count`` would.
        """
        counters = {name: cls(name, **options) for name in names}
        contexts = [c._ctx for c in counters.values()]
        if not contexts:
            return {}
        return contexts[0].run(read_many(contexts, nocache=nocache))

    @property
    def count(self) -> int:
        """The current total (cached when possible). Assign to set it."""
        return self.get_count()

    @count.setter
    def count(self, value: int) -> None:
        self.set_count(value)

    @datastore_failures_as_ours
    def set_count(self, value: int) -> None:
        """Set the counter to ``value`` atomically with respect to concurrent increments.

        The shards are rewritten in one transaction that reads them all: an
        increment either lands before (and is replaced by ``value``) or after
        (and is added to it). Stashed increments are replaced too: the set takes
        what ``delayed_incr`` holds, and fences the folds of it in flight, so
        they write nothing after the set (see ``core/stash.py``). Writers of this
        counter in this process wait for the set; the set retries until
        ``retry_deadline``.

        Raises ``CacheUnavailable``, having written nothing, when memcache is
        configured but cannot take the stash (down, or another set of this
        counter still running at this one's deadline): what it holds would
        otherwise be added on top of ``value`` once memcache answers again.
        ``DatastoreUnavailable`` when the transaction fails (it may have applied).
        """
        paths = self._paths
        refuse_if_bounded(paths.ctx)
        paths.setter.set(value)

    # -- checking the cache against the truth ----------------------------------------

    @datastore_failures_as_ours
    def verify(self) -> Verification:
        """Compare the cached record with the shards, shard by shard.

        Writes that land during the check show as newer versions in the
        record, not as drift, so it can run while the counter is busy.
        Raises ``CacheUnavailable`` when memcache is configured but down.
        """
        paths = self._paths
        return paths.ctx.run(paths.reader.verify())

    @datastore_failures_as_ours
    def repair(self) -> Verification:
        """Resolve unsure writes and write any pending delayed_incr to a shard, then
        rebuild the cached record.

        Returns the verification after the repair.
        """
        paths = self._paths
        ctx = paths.ctx
        if ctx.backend.cache.enabled:
            ctx.picker.resolve_now()
            ctx.run(paths.resolver.resolve(look=True))
            ctx.run(paths.writes.fold_pending())
            ctx.run(paths.reader.rebuild_cached_record())
        return ctx.run(paths.reader.verify())

    @datastore_failures_as_ours
    def delete(self) -> int:
        """Delete every shard, the cached total and any pending stash.

        Returns the number of shards deleted. Raises ``CacheUnavailable``
        (having deleted nothing) when memcache is configured but unreachable,
        since a stash left behind would be added to the next counter of this name.
        Idempotency keys stay remembered (store/keyed.py).
        """
        ctx = self._ctx
        cache = ctx.backend.cache
        if cache.enabled:
            cache.forget(ctx.stash_key)
        removed = ctx.run(ctx.backend.store.delete_all(self.name))
        if cache.enabled:
            # After the shards: a reader refilling meanwhile must not outlive them.
            cache.forget(ctx.record_key)
        return removed

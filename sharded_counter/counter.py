"""``Counter``: the orchestration of a sharded counter, and nothing else.

::

    increment(n) -> queue behind writes of this counter already in flight, if too many
                    (paths/combiner.py: a queued group goes out as one write of its sum)
                 -> take stashed delayed_incr -> write a random shard (+n +stash)
                    ok: merge the shard's new state into the cached record
                    failed after retries: stash n (+stash) in delayed_incr
                    outcome unknown after retries: keep it as an unsure entry
                    in delayed_incr, resolved later by a token-checked transaction
    count        -> complete cached record? its total + pending stash
                    else: read every shard, cache the total safely, add the stash
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import datastore

from .cache.client import MemcacheClient
from .core.keys import cache_keys
from .core.record import Drift, ShardState
from .core.stash import ANY_SHARD, Stash, Unsure
from .core.tokens import folding_write, new_token
from .core.validation import INT64_MAX, check_delta, check_name, check_value, fits_int64
from .errors import (
    CacheUnavailable,
    CounterOverflowError,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
)
from .paths.backend import Backend, backend_for
from .paths.combiner import combiner_for
from .paths.picker import picker_for
from .paths.stats import WriteStats
from .settings import OPTION_NAMES, Settings, resolve
from .store.joined import check_transaction, stage_increment
from .store.keyed import MAX_KEYS_PER_WRITE, check_idempotency_key
from .store.retry import (
    CONTENTION,
    RETRYABLE,
    datastore_failures_as_ours,
    outcome_unknown,
    write_retrying,
)
from .store.shards import ShardOverflow, Snapshot, spread

log = logging.getLogger("sharded_counter")

# The transform path cannot see a shard's value before adding to it, and the
# server saturates at the int64 edge instead of failing. So where transforms
# are used a shard holds at most 2**62 (sets and transaction writes keep to
# that), transform deltas stay under 2**32, and a transform result past 2**62
# spreads the total evenly again, or, when even that cannot bring the shards
# back under, sends this process's writes of the counter through transactions.
# A shard could then only saturate after 2**30 further transform writes that
# all missed both signals.
_TRANSFORM_MAX_DELTA = 2**32
_TRANSFORM_SHARD_LIMIT = 2**62
# Slack on top of a fold's own time limits before its marker in delayed_incr expires.
_FOLD_MARGIN = 2.0
# The longest this process's writers hold back, in all, for one count = v of another
# process (see CacheTier.wait_out_set); only a set that died waits it out in full.
_SET_WAIT_CAP = 2.0
# After a failed try at resolving unsure writes, this process waits this long before
# the next: reads and writes should not each pay a timeout while Datastore is down.
_RESOLVE_PAUSE = 1.0


class _OutcomeUnknown(Exception):
    """The write's retries ran out after an attempt whose outcome is unknown (internal)."""

    def __init__(self, shard: int) -> None:
        super().__init__(shard)
        self.shard = shard


class Counter:
    """A counter spread over ``shards`` Datastore entities, with its total cached in memcache.

    ``Counter('hits')`` connects from the environment; keyword arguments override
    any option of ``Settings`` (see ``sharded_counter.settings``), and
    ``datastore_client`` / ``memcache_client`` take clients you made yourself.
    """

    #: Shards for this class of counter; None takes ``config`` (10 when unset).
    #: On an instance it reads as the shard count in force.
    shards: int | None = None

    def __init__(
        self,
        name: str,
        *,
        datastore_client: datastore.Client | None = None,
        memcache_client: MemcacheClient | None = None,
        **options: Any,
    ) -> None:
        self.name = check_name(name)
        self.settings: Settings = resolve(options, class_options(type(self)))
        self.shards = self.settings.shards
        self._backend: Backend = backend_for(self.settings, datastore_client, memcache_client)
        self._record_key, self._stash_key = cache_keys(
            self.settings.key_prefix, self._backend.store.scope, self.name
        )
        self.stats = WriteStats()
        self._picker = picker_for(self._backend.store.scope, self.name)
        self._combiner = combiner_for(
            id(self._backend), self._backend.store.scope, self.settings, self.name
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shards={self.shard_count})"

    @property
    def shard_count(self) -> int:
        """The number of shards new increments are spread over."""
        return self.settings.shards

    @property
    def write_mode(self) -> str:
        """ "transform" (one commit, no read) or "transaction" (read, add, write)."""
        return self._backend.write_mode

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
        if transaction is not None:
            self._increment_joined(delta, transaction, key)
            return
        if key is not None:
            self._combiner.run_keyed(
                key,
                delta,
                self._write_keyed,
                limit=self.settings.max_concurrent_writes,
                max_total=_TRANSFORM_MAX_DELTA,
                max_keys=MAX_KEYS_PER_WRITE,
            )
            return
        if delta:
            self._combiner.run(
                delta,
                self._apply,
                limit=self.settings.max_concurrent_writes,
                max_total=_TRANSFORM_MAX_DELTA,
            )

    def _apply(self, delta: int) -> None:
        """Write ``delta`` (plus any stash) to a shard and merge it into the cache.

        When the write keeps failing for sure it is stashed (any stash taken
        is put back). A write whose outcome stayed unknown is kept as an unsure
        entry instead, since writing it again could count it twice.
        """
        cache = self._backend.cache
        cache.wait_out_set(self._stash_key, _SET_WAIT_CAP)
        self._resolve_unsure()
        token = new_token()  # names this write, and its fold of the stash if any
        with self._picker.writing(token):
            stashed = self._take_stash(token)
            amount = delta + stashed
            if not fits_int64(amount):
                # Write the caller's delta alone; the stash waits for a later write.
                self._settle_fold(token, stashed, put_back=True)
                stashed, amount = 0, delta
            try:
                state = self._write(amount, token, folded=stashed)
            except _OutcomeUnknown as unknown:
                self._keep_unsure(token, delta, stashed, unknown)
                return
            except RETRYABLE as exc:
                # Certainly not applied, and Datastore may well take it a moment from now.
                self._settle_fold(token, stashed, put_back=True)
                self._stash_or_raise(delta, exc)
                return
            except gexc.GoogleAPICallError as exc:
                # Refused for a reason no retry cures (a missing permission or database,
                # a request the server rejects): stashing it would acknowledge an
                # increment that no later write could land either.
                self._settle_fold(token, stashed, put_back=True)
                raise IncrementNotRecorded(self.name, delta, exc) from exc
            except CounterOverflowError:
                self._settle_fold(token, stashed, put_back=True)
                raise
            if stashed:
                self._settle_fold(token, stashed, put_back=False)
                self.stats.add(folded=1)
        cache.merge(self._record_key, self._stash_key, [state])
        if abs(state.value) > _TRANSFORM_SHARD_LIMIT and self._backend.write_mode == "transform":
            self._rebalance()

    def _increment_joined(
        self, delta: int, transaction: datastore.Transaction, key: str | None
    ) -> None:
        store = self._backend.store
        check_transaction(transaction, store.client.project)
        cache = self._backend.cache
        record_key = self._record_key
        try:
            stage_increment(
                transaction,
                name=self.name,
                shards=self.shard_count,
                namespace=store.client.namespace,
                delta=delta,
                after_commit=lambda: cache.invalidate(record_key),
                idempotency_key=key,
                key_ttl=self.settings.idempotency_ttl,
            )
        except gexc.GoogleAPICallError as exc:
            # A read in the caller's transaction failed: nothing was staged.
            raise IncrementNotRecorded(self.name, delta, exc) from exc

    # -- keyed writes (store/keyed.py) ---------------------------------------------

    def _write_keyed(self, keys: dict[str, int]) -> dict[str, BaseException]:
        """Write the keyed increments ``keys`` (key -> delta) together; returns the
        errors of the keys that failed, each key's own."""
        self._backend.cache.wait_out_set(self._stash_key, _SET_WAIT_CAP)
        self._resolve_unsure()
        left = dict(keys)  # keys not yet found applied
        doubtful = False  # an attempt that carried ``left`` may have landed
        state: ShardState | None = None
        try:
            for attempt in write_retrying(self.settings):
                with attempt:
                    try:
                        state = self._keyed_attempt(left)
                    except gexc.GoogleAPICallError as exc:
                        doubtful = self._attempt_failed(exc) or doubtful
                        raise
        except Exception as exc:
            if doubtful:
                self._backend.cache.invalidate(self._record_key)
                return {k: IncrementOutcomeUnknown(self.name, d, exc) for k, d in left.items()}
            if isinstance(exc, gexc.GoogleAPICallError):
                return {k: IncrementNotRecorded(self.name, d, exc) for k, d in left.items()}
            return dict.fromkeys(left, exc)
        if state is not None:
            self.stats.add(writes=1, keys_applied=len(left))
            self._backend.cache.merge(self._record_key, self._stash_key, [state])
            if abs(state.value) > _TRANSFORM_SHARD_LIMIT and self.write_mode == "transform":
                self._rebalance()
        if doubtful:
            # An attempt whose reply was lost may have landed on a shard the cached record
            # never heard of (a retry finds the key and writes nothing): rebuild it.
            self._backend.cache.invalidate(self._record_key)
        return {}

    def _keyed_attempt(self, left: dict[str, int]) -> ShardState | None:
        """One attempt at writing ``left``; keys found applied already leave it.

        Returns the shard written, or None when every key was applied already.
        A key's record is inserted, never overwritten: ``AlreadyExists`` means
        some key of the commit is applied (by another delivery, or by an earlier
        attempt of this one whose reply was lost), and nothing was written, so
        the keys are looked up and the rest go out again.
        """
        keyed, ttl = self._backend.keyed, self.settings.idempotency_ttl
        with self._picker.pick(self.shard_count) as (index, _alone):
            while left:
                if self._transform_fits(sum(left.values())):
                    try:
                        return keyed.add_with_transform(self.name, index, left, ttl=ttl)
                    except gexc.AlreadyExists:
                        applied = keyed.applied(self.name, left)
                else:
                    try:
                        state, applied = self._keyed_in_transaction(index, left)
                    except gexc.AlreadyExists:
                        applied = keyed.applied(self.name, left)
                    else:
                        for key in applied:
                            del left[key]
                        return state
                if not applied:
                    # Refused for a record that is gone again (purged): just contention.
                    raise gexc.Aborted(  # type: ignore[no-untyped-call]
                        "an idempotency key record came and went"
                    )
                for key in applied:
                    del left[key]
        return None

    def _keyed_in_transaction(
        self, first: int, left: dict[str, int]
    ) -> tuple[ShardState | None, set[str]]:
        """The transaction path of a keyed write: ``first`` shard, else any with room."""
        keyed, backend = self._backend.keyed, self._backend
        others = [i for i in random.sample(range(self.shard_count), self.shard_count) if i != first]
        for index in [first, *others]:
            try:
                return keyed.add_in_transaction(
                    self.name,
                    index,
                    left,
                    ttl=self.settings.idempotency_ttl,
                    lazy_begin=backend.lazy_begin,
                    limit=self._shard_limit,
                )
            except ShardOverflow:
                continue
        raise CounterOverflowError(
            f"counter {self.name!r} cannot take {sum(left.values())}: no one of its "
            f"{self.shard_count} shards has room for a keyed increment; nothing was written"
        )

    def _write(self, amount: int, token: str, *, folded: int = 0) -> ShardState:
        """Write ``amount`` to a shard, retrying per the policy; the caller pins ``token``.

        A write that folds in ``folded`` from delayed_incr goes through a
        transaction, which looks for its token first: a ``count = v`` may have
        fenced it, or a resolution written its fold part (core/stash.py). Its shard
        stays reserved until the caller settles the fold (see paths/picker.py).

        After contention (nothing was written) a retry goes to another shard.
        After a failure whose outcome is unknown (a timeout, a dropped
        connection: the commit may have landed) it goes to the same shard, in
        a transaction that first looks for this write's token there. If the
        retries run out after that, ``_OutcomeUnknown`` names the shard, which
        stays reserved (see ``paths/picker.py``) until the write is resolved.
        """
        backend = self._backend
        unsure_of: int | None = None  # the shard an unknown-outcome attempt went to
        try:
            for attempt in write_retrying(self.settings):
                with attempt:
                    index = None
                    try:
                        with self._picker.pick(self.shard_count, prefer=unsure_of) as (
                            index,
                            alone,
                        ):
                            # Inside the attempt: the first call may probe the backend.
                            transform = not folded and self._transform_fits(amount)
                            if unsure_of is None and alone and transform:
                                state = backend.store.add_with_transform(
                                    self.name, index, amount, token=token
                                )
                            else:
                                state = self._add_in_transaction(index, amount, token, folded)
                            if folded and state.shard_id.startswith("i"):
                                # Still held: no transform of this process replaces the
                                # token there before the fold is settled.
                                self._picker.reserve(token, int(state.shard_id[1:]))
                    except gexc.GoogleAPICallError as exc:
                        # Retried only when RETRYABLE; any error may leave the outcome
                        # unknown (a cancelled call, say), retried or not.
                        unknown = self._attempt_failed(exc)
                        if unsure_of is None and index is not None and unknown:
                            unsure_of = index
                            # Keep this process's other writers off that shard until the
                            # write is resolved: a transform of theirs would replace the
                            # token in this process's slot.
                            self._picker.reserve(token, index)
                        raise
                    self.stats.add(writes=1)
                    if not folded:
                        self._picker.release(token)
                    return state
        except Exception as exc:
            if unsure_of is None or isinstance(exc, CounterOverflowError):
                raise
            raise _OutcomeUnknown(unsure_of) from exc
        raise AssertionError("unreachable: the retry policy re-raises the last error")

    def _attempt_failed(self, exc: gexc.GoogleAPICallError) -> bool:
        """Tally one failed write attempt; returns whether it may have been applied."""
        if isinstance(exc, CONTENTION):
            self.stats.add(aborts=1)
        elif isinstance(exc, RETRYABLE):
            self.stats.add(transient_errors=1)
        return outcome_unknown(exc)

    def _transform_fits(self, amount: int) -> bool:
        return (
            self._backend.write_mode == "transform"
            and abs(amount) <= _TRANSFORM_MAX_DELTA
            and not self._picker.transforms_unsafe
        )

    def _add_in_transaction(
        self, first: int, amount: int, token: str = "", folded: int = 0
    ) -> ShardState:
        store, lazy, limit = self._backend.store, self._backend.lazy_begin, self._shard_limit
        others = [i for i in random.sample(range(self.shard_count), self.shard_count) if i != first]
        # The token goes along everywhere: a fence (core/stash.py) is on every shard.
        pinned = self._picker.pinned()
        for index in [first, *others]:
            try:
                return store.add_in_transaction(
                    self.name,
                    index,
                    amount,
                    lazy_begin=lazy,
                    limit=limit,
                    token=token,
                    folded=folded,
                    pinned=pinned,
                )
            except ShardOverflow:
                continue
        # No one shard has room: spread total + amount over all of them, in one transaction.
        try:
            states = store.rewrite(
                self.name,
                self.shard_count,
                lazy_begin=lazy,
                limit=limit,
                adding=amount,
                token=token,
                folded=folded,
                pinned=pinned,
            )
        except ValueError:
            raise CounterOverflowError(
                f"counter {self.name!r} cannot take {amount}: its {self.shard_count} shards "
                f"would pass {limit} each; nothing was written"
            ) from None
        self._backend.cache.merge(self._record_key, self._stash_key, states[1:])
        return states[0]

    @property
    def _shard_limit(self) -> int:
        """The most one shard may hold: 2**62 where this counter writes with transforms
        (see above), else the whole int64 range."""
        return _TRANSFORM_SHARD_LIMIT if self._backend.write_mode == "transform" else INT64_MAX

    def _rebalance(self) -> None:
        """Spread the total evenly again, so no shard sits past the transform limit."""
        try:
            states = self._rewrite(lambda total: total)
        except ValueError:
            self._picker.transforms_unsafe = True
            log.warning(
                "counter %r is too large for transform writes; this process writes it "
                "through transactions from now on",
                self.name,
            )
            return
        except (CounterOverflowError, gexc.GoogleAPICallError) as exc:
            log.warning("could not rebalance counter %r: %s", self.name, exc)
            return
        self.stats.add(rebalances=1)
        self._backend.cache.merge(self._record_key, self._stash_key, states)

    def _rewrite(
        self, target: Callable[[int], int], fence: Sequence[str] = (), token: str = ""
    ) -> list[ShardState]:
        backend = self._backend
        for attempt in write_retrying(self.settings, until_deadline=True):
            with attempt:
                return backend.store.rewrite(
                    self.name,
                    self.shard_count,
                    target,
                    lazy_begin=backend.lazy_begin,
                    limit=self._shard_limit,
                    fence=fence,
                    token=token,
                )
        raise AssertionError("unreachable: the retry policy re-raises the last error")

    # -- delayed_incr -----------------------------------------------------------

    def _fold_deadline(self) -> float:
        """When a fold begun now is over for sure: its write gave up or landed by then."""
        settings = self.settings
        return time.time() + settings.retry_deadline + settings.rpc_timeout + _FOLD_MARGIN

    def _take_stash(self, token: str, *, look: bool = False) -> int:
        if not self._backend.cache.enabled:
            return 0
        try:
            return self._backend.cache.take_stash(
                self._stash_key, token, self._fold_deadline(), look=look
            )
        except CacheUnavailable:
            return 0  # it stays in memcache and is taken by a later write

    def _settle_fold(self, token: str, stashed: int, *, put_back: bool) -> None:
        """End the fold ``token`` in delayed_incr. Its token stays pinned (and its shard
        reserved) while the stash still names the write (see ``CacheTier.settle_fold``)."""
        if not stashed:
            return
        if self._backend.cache.settle_fold(self._stash_key, token, put_back=put_back):
            self._picker.release(token)
        else:
            self._picker.keep(token)

    # -- unsure writes (see core/stash.py) ---------------------------------------------

    def _keep_unsure(self, token: str, delta: int, stashed: int, unknown: _OutcomeUnknown) -> None:
        """The write ``token`` (``delta`` plus ``stashed`` folded in) may have landed:
        keep it in delayed_incr as unsure, replacing its fold marker, for a token-checked
        transaction to resolve. Raises IncrementOutcomeUnknown if memcache cannot."""
        cause = unknown.__cause__ or unknown
        amount = delta + stashed
        try:
            self._backend.cache.make_unsure(
                self._stash_key, token, amount, unknown.shard, folded=stashed
            )
        except CacheUnavailable as exc:
            # The caller's delta is in doubt now. What the fold took is not: its marker
            # stays, and once past its deadline its resolution looks for the token.
            if stashed:
                self._picker.keep(token)
            else:
                self._picker.release(token)
            raise IncrementOutcomeUnknown(self.name, delta, exc) from cause
        self._picker.keep(token)
        self.stats.add(unsure=1)
        log.warning(
            "counter %r: shard write's outcome unknown after retries (%s); %d kept in "
            "delayed_incr as unsure until a transaction on shard %d resolves it",
            self.name,
            cause,
            amount,
            unknown.shard,
        )

    def _resolve_unsure(self, *, look: bool = False) -> bool:
        """Resolve the unsure writes of this counter, if there are any and it is time.

        One token-checked transaction per write on its shard: it adds the amount
        unless the token is there already. The fold part of a vanished writer
        takes one transaction over every shard instead (see core/stash.py). ``look``
        asks memcache even when this process saw none lately. Returns whether
        anything was resolved. Never raises: what fails stays unsure for a later try.
        """
        cache, picker = self._backend.cache, self._picker
        if not cache.enabled or not picker.resolution_due():
            return False
        own = picker.kept()  # before the claim reads the stash: so each was in it by then
        if not (look or own or cache.unsure_seen(self._stash_key)):
            return False
        claim = secrets.token_hex(6)
        try:
            before, claimed = cache.claim_unsure(self._stash_key, claim, self._fold_deadline())
        except CacheUnavailable:
            picker.resolution_failed(_RESOLVE_PAUSE)
            return False
        for token in own:
            if not before.mentions(token):
                picker.release(token)  # resolved elsewhere, or replaced by a set
        resolved = failed = False
        for token, entry in claimed.items():
            if failed:  # Datastore failed on an earlier one: try them all later
                cache.finish_unsure(self._stash_key, token, claim, written=False)
                continue
            try:
                states = self._resolve_one(token, entry)
            except ShardOverflow as full:
                # Not there (the token was looked for first), and that shard is full.
                cache.unsure_to_pending(self._stash_key, token, claim, full.delta)
                picker.release(token)
                continue
            except (gexc.GoogleAPICallError, ValueError) as exc:
                # ValueError: a fold part that no spread of the total can take.
                log.warning("counter %r: could not resolve an unsure write: %s", self.name, exc)
                cache.finish_unsure(self._stash_key, token, claim, written=False)
                picker.resolution_failed(_RESOLVE_PAUSE)
                failed = True
                continue
            cache.finish_unsure(self._stash_key, token, claim, written=True)
            picker.release(token)
            self.stats.add(resolved=1)
            cache.merge(self._record_key, self._stash_key, states)
            resolved = True
        return resolved

    def _resolve_one(self, token: str, entry: Unsure) -> list[ShardState]:
        """Add the unsure write ``token`` unless the shards show it (core/stash.py)."""
        backend = self._backend
        if entry.shard != ANY_SHARD:
            state = backend.store.add_in_transaction(
                self.name,
                entry.shard,
                entry.amount,
                lazy_begin=backend.lazy_begin,
                limit=self._shard_limit,
                token=token,
                folded=entry.folded,
                pinned=self._picker.pinned(),
            )
            return [state]
        # A vanished writer's fold part: its write may be on any shard. One transaction
        # reads them all; it adds the amount only if the write's token is on none of
        # them, and fences the fold token on every one, so the writer, if it wakes,
        # writes only its own delta. Retried: every shard write aborts it meanwhile.
        writer = folding_write(token)
        if writer is None:
            raise ValueError(f"unsure entry {token!r} for any shard is not a fold part")
        for attempt in write_retrying(self.settings):
            with attempt:
                return backend.store.rewrite(
                    self.name,
                    self.shard_count,
                    lazy_begin=backend.lazy_begin,
                    limit=self._shard_limit,
                    adding=entry.amount,
                    token=writer,
                    folded=entry.amount,
                    fence=[token],
                )
        raise AssertionError("unreachable: the retry policy re-raises the last error")

    def _stash_or_raise(self, amount: int, cause: Exception) -> None:
        """Keep ``amount``, which certainly did not reach a shard, in delayed_incr.

        Raises IncrementNotRecorded if memcache refused it, IncrementOutcomeUnknown
        if the stash's own write may have been applied (its reply was lost).
        """
        try:
            self._backend.cache.stash(self._stash_key, amount)
        except CacheUnavailable as exc:
            if exc.maybe_applied:
                raise IncrementOutcomeUnknown(self.name, amount, exc) from cause
            raise IncrementNotRecorded(self.name, amount, exc) from cause
        self.stats.add(stashed=1)
        log.warning(
            "counter %r: shard write failed (%s); %d kept in delayed_incr until the next write",
            self.name,
            cause,
            amount,
        )

    # -- reading ----------------------------------------------------------------

    @datastore_failures_as_ours
    def get_count(self, nocache: bool = False) -> int:
        """The counter's total.

        From the cached record when one is complete; otherwise (or with
        ``nocache=True``) the sum of every ``CounterShard`` with this name, plus
        what ``delayed_incr`` holds: increments still pending, and writes whose
        outcome is unknown (a read first tries to resolve those, see ``core/stash.py``).
        """
        cache = self._backend.cache
        if not nocache and cache.enabled:
            try:
                record, stash = cache.read(self._record_key, self._stash_key)
                if cache.unsure_seen(self._stash_key) and self._resolve_unsure():
                    record, stash = cache.read(self._record_key, self._stash_key)
                if record is not None:
                    return record.total + stash
                total = cache.fill(self._record_key, self._shard_states)
                return total + stash
            except CacheUnavailable:
                pass
        if cache.enabled:
            self._resolve_unsure(look=True)
        total = self._snapshot().total
        return total + self._pending_stash()

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
        if not counters:
            return {}
        first = next(iter(counters.values()))
        backend, settings = first._backend, first.settings
        cache = backend.cache
        totals: dict[str, int] = {}
        cache_down = False
        if not nocache and cache.enabled:
            try:
                pairs = [(c._record_key, c._stash_key) for c in counters.values()]
                stashes: dict[str, int] = {}
                misses: dict[str, Counter] = {}
                for counter, (record, stash) in zip(
                    counters.values(), cache.read_many(pairs), strict=True
                ):
                    if record is not None:
                        totals[counter.name] = record.total + stash
                    else:
                        misses[counter._record_key] = counter
                        stashes[counter._record_key] = stash

                def read_shards(keys: list[str]) -> dict[str, Iterable[ShardState]]:
                    found = _retrying_snapshots(backend, settings, [misses[k].name for k in keys])
                    return {k: found[misses[k].name].states for k in keys}

                filled = cache.fill_many(list(misses), read_shards)
                for key, counter in misses.items():
                    totals[counter.name] = filled[key] + stashes[key]
            except CacheUnavailable:
                totals.clear()
                cache_down = True
            else:
                return totals
        pending: dict[str, int] = {}
        if cache.enabled and not cache_down:
            with contextlib.suppress(CacheUnavailable):
                pending = cache.peek_stashes([c._stash_key for c in counters.values()])
        found = _retrying_snapshots(backend, settings, list(counters))
        return {
            name: found[name].total + pending.get(counter._stash_key, 0)
            for name, counter in counters.items()
        }

    def _shard_states(self) -> list[ShardState]:
        return list(self._snapshot().states)

    def _snapshot(self) -> Snapshot:
        """Every shard, read under the same retry policy as the writes."""
        for attempt in write_retrying(self.settings):
            with attempt:
                return self._backend.store.snapshot(self.name)
        raise AssertionError("unreachable: the retry policy re-raises the last error")

    def _pending_stash(self) -> int:
        if not self._backend.cache.enabled:
            return 0
        try:
            return self._backend.cache.peek_stash(self._stash_key)
        except CacheUnavailable:
            return 0

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
        """
        value = check_value(value, self.shard_count)
        spread(value, self.shard_count, self._shard_limit)  # refuse what cannot fit, early
        # This process's own writers of the counter wait meanwhile: on an optimistic
        # engine each of their commits would abort the set's transaction.
        with self._combiner.exclusive():
            self._set_now(value)

    def _set_now(self, value: int) -> None:
        cache = self._backend.cache
        token = new_token()
        coordinated, taken = False, Stash()
        if cache.enabled:
            # Stop new folds, take what is owed, fence the folds in flight (core/stash.py).
            # The marker outlives the set's own time limits (its transaction, then
            # one call to end it), so only a setter that died leaves it to expire.
            set_over = self._fold_deadline() + self.settings.rpc_timeout
            try:
                taken = cache.begin_set(self._stash_key, token, set_over)
                coordinated = True
            except CacheUnavailable:
                pass  # nothing can be taken or stashed while memcache is down either
        # The set's own token goes in the fence too: what it took is settled by it, and
        # a retry after an attempt whose outcome is unknown finds it and writes nothing.
        fence = [token, *taken.fence]
        try:
            states = self._rewrite(lambda _current: value, fence=fence, token=token)
        except BaseException:
            if coordinated:
                self._end_set(token, landed=False)
            raise
        if coordinated:
            self._end_set(token, landed=True)
        cache.merge(self._record_key, self._stash_key, states)

    def _end_set(self, token: str, *, landed: bool) -> None:
        try:
            self._backend.cache.end_set(self._stash_key, token, landed=landed)
        except CacheUnavailable as exc:
            # Nothing is lost: the marker's deadline ends the set as "not landed", and
            # the shards' fence then tells the resolution what the set replaced.
            log.warning(
                "counter %r: memcache failed while ending a set (%s); delayed_incr settles "
                "it when the set's marker expires",
                self.name,
                exc,
            )

    # -- checking the cache against the truth ----------------------------------------

    @datastore_failures_as_ours
    def verify(self) -> Verification:
        """Compare the cached record with the shards, shard by shard.

        Writes that land during the check show as newer versions in the
        record, not as drift, so it can run while the counter is busy.
        Raises ``CacheUnavailable`` when memcache is configured but down.
        """
        cache = self._backend.cache
        record = cache.peek(self._record_key) if cache.enabled else None
        pending = cache.peek_stash(self._stash_key) if cache.enabled else 0
        snapshot = self._snapshot()
        cached = record if record is not None and record.complete else None
        drift = Drift.between(cached, snapshot.states) if cached is not None else Drift(0, 0)
        return Verification(
            name=self.name,
            cached=None if cached is None else cached.total + pending,
            shards=snapshot.total,
            pending=pending,
            stale_shards=drift.stale,
            drift=drift.difference,
        )

    @datastore_failures_as_ours
    def repair(self) -> Verification:
        """Resolve unsure writes and write any pending delayed_incr to a shard, then
        rebuild the cached record.

        Returns the verification after the repair.
        """
        cache = self._backend.cache
        if cache.enabled:
            self._picker.resolve_now()
            self._resolve_unsure(look=True)
            token = new_token()
            with self._picker.writing(token):
                pending = cache.take_stash(self._stash_key, token, self._fold_deadline(), look=True)
                if pending:
                    try:
                        state = self._write(pending, token, folded=pending)
                    except _OutcomeUnknown as unknown:
                        self._keep_unsure(token, 0, pending, unknown)  # it may have landed
                    except BaseException:
                        self._settle_fold(token, pending, put_back=True)
                        raise
                    else:
                        self._settle_fold(token, pending, put_back=False)
                        self.stats.add(folded=1)
                        cache.merge(self._record_key, self._stash_key, [state])
            cache.forget(self._record_key)
            cache.fill(self._record_key, self._shard_states)
        return self.verify()

    @datastore_failures_as_ours
    def delete(self) -> int:
        """Delete every shard, the cached total and any pending stash.

        Returns the number of shards deleted. Raises ``CacheUnavailable``
        (having deleted nothing) when memcache is configured but unreachable,
        since a stash left behind would be added to the next counter of this name.
        """
        cache = self._backend.cache
        if cache.enabled:
            cache.forget(self._stash_key)
        removed = self._backend.store.delete_all(self.name)
        if cache.enabled:
            # After the shards: a reader refilling meanwhile must not outlive them.
            cache.forget(self._record_key)
        return removed


@dataclasses.dataclass(frozen=True)
class Verification:
    """One counter's cached total against its shards (see ``Counter.verify``)."""

    name: str
    cached: int | None  # the cached total (record + pending), None when not cached
    shards: int  # the sum of every shard
    pending: int  # what delayed_incr holds: pending, and writes of unknown outcome
    stale_shards: int  # shards the cache holds at an older version, or lacks
    drift: int  # how far the cached total is off because of them

    @property
    def ok(self) -> bool:
        return self.stale_shards == 0


def _retrying_snapshots(
    backend: Backend, settings: Settings, names: list[str]
) -> dict[str, Snapshot]:
    for attempt in write_retrying(settings):
        with attempt:
            return backend.store.snapshots(names, use_in=backend.is_firestore)
    raise AssertionError("unreachable: the retry policy re-raises the last error")


def class_options(cls: type) -> dict[str, Any]:
    """Options set as class attributes on a Counter subclass (``shards = 20``)."""
    options: dict[str, Any] = {}
    # Counter's own attributes (its properties among them) are not options.
    for klass in reversed(cls.__mro__[: cls.__mro__.index(Counter)]):
        for option in OPTION_NAMES:
            if option in vars(klass) and vars(klass)[option] is not None:
                options[option] = vars(klass)[option]
    return options

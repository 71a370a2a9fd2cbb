"""Keyed increments: the write of a group of idempotency keys and its answer per key.

The shard and the keys' records go in one commit (``store/keyed.py``); a
record that exists already refuses the commit, the keys are looked up, and
the rest go out again. How the attempts end decides each key's answer, by
``core/outcomes.KEYED``: a keyed increment is never kept in memcache.
"""

from __future__ import annotations

import random

from google.api_core import exceptions as gexc

from ..core import outcomes
from ..core.effects import Steps, retrying
from ..core.outcomes import Step
from ..core.record import ShardState
from ..errors import CounterOverflowError, IncrementNotRecorded, IncrementOutcomeUnknown
from ..store.retry import write_policy
from ..store.shards import ShardOverflow
from .context import SET_WAIT_CAP, CounterContext
from .shard_writes import ShardWriter, ending_of
from .unsure import UnsureResolver


class KeyedWrites:
    """The keyed increments of one counter in this process."""

    def __init__(self, ctx: CounterContext, shards: ShardWriter, resolver: UnsureResolver):
        self.ctx = ctx
        self.shards = shards
        self.resolver = resolver

    def write(self, keys: dict[str, int]) -> Steps[dict[str, BaseException]]:
        """Write the keyed increments ``keys`` (key -> delta) together; returns the
        errors of the keys that failed, each key's own."""
        ctx = self.ctx
        cache = ctx.backend.cache.steps
        yield from cache.sets.wait_out_set(ctx.stash_key, SET_WAIT_CAP)
        yield from self.resolver.resolve()
        left = dict(keys)  # keys not yet found applied
        doubtful = False  # an attempt that carried ``left`` may have landed

        def attempt() -> Steps[ShardState | None]:
            nonlocal doubtful
            try:
                yield from ctx.backend.probed()  # the first call may probe the backend
                written: ShardState | None = yield from self._attempt(left)
            except gexc.GoogleAPICallError as exc:
                doubtful = self.shards.attempt_failed(exc) or doubtful
                raise
            return written

        try:
            state: ShardState | None = yield from retrying(write_policy(ctx.settings), attempt)
        except Exception as exc:
            if doubtful:
                # Whatever landed is on a shard the cached record never heard of.
                yield from cache.records.invalidate(ctx.record_key)
                step = outcomes.KEYED[outcomes.Ending.DOUBTFUL]
            elif isinstance(exc, (CounterOverflowError, gexc.GoogleAPICallError)):
                step = outcomes.KEYED[ending_of(exc)]
            else:
                return dict.fromkeys(left, exc)
            return {k: self._error(step, d, exc) for k, d in left.items()}
        if state is not None:
            ctx.shard_written(keys_applied=len(left))
            yield from cache.records.merge(ctx.record_key, ctx.stash_key, [state])
            yield from self.shards.rebalance_if_needed(state)
        if doubtful:
            # An attempt whose reply was lost may have landed on a shard the cached record
            # never heard of (a retry finds the key and writes nothing): rebuild it.
            yield from cache.records.invalidate(ctx.record_key)
        return {}

    def _error(self, step: Step, delta: int, cause: BaseException) -> BaseException:
        if step is Step.OUTCOME_UNKNOWN:
            return IncrementOutcomeUnknown(self.ctx.name, delta, cause)
        if step is Step.OVERFLOW:
            return cause
        assert step is Step.NOT_RECORDED, step
        return IncrementNotRecorded(self.ctx.name, delta, cause)

    def _attempt(self, left: dict[str, int]) -> Steps[ShardState | None]:
        """One attempt at writing ``left``; keys found applied already leave it.

        Returns the shard written, or None when every key was applied already.
        A key's record is inserted, never overwritten: ``AlreadyExists`` means
        some key of the commit is applied (by another delivery, or by an earlier
        attempt of this one whose reply was lost), and nothing was written, so
        the keys are looked up and the rest go out again.
        """
        ctx = self.ctx
        keyed, ttl = ctx.backend.keyed, ctx.settings.idempotency_ttl
        with ctx.picker.pick(ctx.shards) as (index, _alone):
            while left:
                if ctx.transform_fits(sum(left.values())):
                    try:
                        written: ShardState = yield from keyed.add_with_transform(
                            ctx.name, index, left, ttl=ttl
                        )
                    except gexc.AlreadyExists:
                        applied = yield from keyed.applied(ctx.name, left)
                    else:
                        return written
                else:
                    try:
                        state, applied = yield from self._in_transaction(index, left)
                    except gexc.AlreadyExists:
                        applied = yield from keyed.applied(ctx.name, left)
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

    def _in_transaction(
        self, first: int, left: dict[str, int]
    ) -> Steps[tuple[ShardState | None, set[str]]]:
        """The transaction path of a keyed write: ``first`` shard, else any with room."""
        ctx = self.ctx
        others = [i for i in random.sample(range(ctx.shards), ctx.shards) if i != first]
        for index in [first, *others]:
            try:
                found: tuple[
                    ShardState | None, set[str]
                ] = yield from ctx.backend.keyed.add_in_transaction(
                    ctx.name,
                    index,
                    left,
                    ttl=ctx.settings.idempotency_ttl,
                    lazy_begin=ctx.backend.lazy_begin,
                    limit=ctx.shard_limit,
                )
            except ShardOverflow:
                continue
            return found
        raise CounterOverflowError(
            f"counter {ctx.name!r} cannot take {sum(left.values())}: no one of its "
            f"{ctx.shards} shards has room for a keyed increment; nothing was written"
        )

"""A plain increment, from its fold of delayed_incr to its answer.

::

    wait out a running count = v -> resolve unsure writes that are due
    -> take what delayed_incr holds (a fold) -> write n + the fold to a shard
    -> look up the ending in core/outcomes.py, and carry out its step:
         ACKNOWLEDGE  the fold settled, the shard merged into the cached record
         STASH        the fold put back, n added to delayed_incr
         KEEP_UNSURE  n + the fold kept as an unsure entry for its token
         NOT_RECORDED / OUTCOME_UNKNOWN / OVERFLOW   raised, the fold put back

``repair`` folds what is pending the same way: a write of nothing but the fold.
Every method that calls out is steps (core/effects.py): ``Counter`` and
``AsyncCounter`` drive the same sequence.
"""

from __future__ import annotations

import logging

from ..core import outcomes
from ..core.effects import Steps
from ..core.outcomes import Ending, Fold, Step
from ..core.tokens import new_token
from ..core.validation import fits_int64
from ..errors import (
    CacheUnavailable,
    CounterOverflowError,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
)
from .context import SET_WAIT_CAP, CounterContext
from .shard_writes import ShardWriter, WriteFailed
from .unsure import UnsureResolver

log = logging.getLogger("sharded_counter")


class PlainWrites:
    """The plain (unkeyed) increments of one counter in this process."""

    def __init__(self, ctx: CounterContext, shards: ShardWriter, resolver: UnsureResolver):
        self.ctx = ctx
        self.shards = shards
        self.resolver = resolver

    def apply(self, delta: int) -> Steps[Step]:
        """Count ``delta`` (with whatever delayed_incr holds): see the module docstring.
        Returns how it was counted (ACKNOWLEDGE, STASH or KEEP_UNSURE), or raises."""
        return self._write_with_fold(delta)

    def fold_pending(self) -> Steps[Step]:
        """Write what delayed_incr holds now, if anything (``repair``). A failure is
        raised, with what was taken put back."""
        return self._write_with_fold(0, look=True)

    def _write_with_fold(self, delta: int, *, look: bool = False) -> Steps[Step]:
        ctx = self.ctx
        cache = ctx.backend.cache.steps
        yield from cache.sets.wait_out_set(ctx.stash_key, SET_WAIT_CAP)
        yield from self.resolver.resolve()
        token = new_token()  # names this write, and its fold of the stash if any
        with ctx.picker.writing(token):
            taken = yield from self._take_stash(token, look=look)
        if taken is None:
            # The take's reply was lost: a fold marker may name this token, and whoever
            # settles it (this process's backlog, a set's fence, a resolution once it
            # expires) looks for the token on the shards to tell whether the fold
            # landed. This write carries none of it, so it must not carry that token
            # either (found by the simulator: the fold was dropped as landed).
            token, taken = new_token(), 0
        folded = taken
        with ctx.picker.writing(token):
            if not fits_int64(delta + folded):
                # Write the caller's delta alone; the stash waits for a later write.
                yield from self._settle_fold(token, folded, Fold.PUT_BACK)
                folded = 0
            if not delta and not folded:
                return Step.ACKNOWLEDGE
            try:
                state = yield from self.shards.write(delta + folded, token, folded=folded)
            except WriteFailed as failed:
                yield from self._settle_fold(token, folded, outcomes.FOLD[failed.ending])
                step: Step = yield from self._after_failure(failed, token, delta, folded)
                return step
            yield from self._settle_fold(token, folded, outcomes.FOLD[Ending.LANDED])
        yield from cache.records.merge(ctx.record_key, ctx.stash_key, [state])
        yield from self.shards.rebalance_if_needed(state)
        return Step.ACKNOWLEDGE

    def _after_failure(
        self, failed: WriteFailed, token: str, delta: int, folded: int
    ) -> Steps[Step]:
        """Carry out the step the ending leads to (core/outcomes.PLAIN); return it when
        it counts the increment, raise otherwise."""
        step = outcomes.PLAIN[failed.ending]
        cause = failed.__cause__ or failed
        if not delta and step in (Step.STASH, Step.NOT_RECORDED, Step.OVERFLOW):
            raise cause  # a fold alone: what it took is back in pending; say why
        if step is Step.STASH:
            yield from stash_or_raise(self.ctx, delta, cause)
            return step
        if step is Step.KEEP_UNSURE:
            assert failed.shard is not None  # a doubtful ending names its shard
            yield from self._keep_unsure(
                token, delta, folded, failed.shard, cause, failed.transaction
            )
            return step
        if step is Step.OVERFLOW:
            assert isinstance(cause, CounterOverflowError)
            raise cause
        raise IncrementNotRecorded(self.ctx.name, delta, cause) from cause

    # -- delayed_incr ------------------------------------------------------------------

    def _take_stash(self, token: str, *, look: bool) -> Steps[int | None]:
        """What this write takes from delayed_incr for the fold ``token``; None when the
        take may have been made but its reply was lost."""
        ctx = self.ctx
        if not ctx.backend.cache.enabled:
            return 0
        try:
            taken: int = yield from ctx.backend.cache.steps.stashes.take_stash(
                ctx.stash_key, token, ctx.fold_deadline(), look=look
            )
        except CacheUnavailable as exc:
            # It stays in memcache and is taken by a later write; a take that may have
            # been made is put back by the backlog (cache/stashes.py).
            return None if exc.maybe_applied else 0
        return taken

    def _settle_fold(self, token: str, folded: int, fold: Fold) -> Steps[None]:
        """End the fold ``token`` in delayed_incr as ``fold`` says. Its token stays pinned
        (and its shard reserved) while the stash still names the write (see
        ``CacheTier.settle_fold``). A fold that is IN_ENTRY ends with its entry."""
        ctx = self.ctx
        if not folded or fold is Fold.IN_ENTRY:
            return
        if fold is Fold.SETTLED:
            ctx.stats.add(folded=1)
        settled = yield from ctx.backend.cache.steps.stashes.settle_fold(
            ctx.stash_key, token, put_back=fold is Fold.PUT_BACK
        )
        if settled:
            ctx.picker.release(token)
        else:
            ctx.picker.keep(token)

    def _keep_unsure(
        self,
        token: str,
        delta: int,
        folded: int,
        shard: int,
        cause: BaseException,
        transaction: bytes | None,
    ) -> Steps[None]:
        """The write ``token`` (``delta`` plus ``folded`` from delayed_incr) may have
        landed on ``shard``: keep it in delayed_incr as unsure, replacing its fold
        marker, for a token-checked transaction to resolve (after rolling back
        ``transaction``, a transform's that may still land, when there is one)."""
        ctx = self.ctx
        amount = delta + folded
        try:
            yield from ctx.backend.cache.steps.unsure.make_unsure(
                ctx.stash_key, token, amount, shard, folded=folded, transaction=transaction or b""
            )
        except CacheUnavailable as exc:
            # The caller's delta is in doubt now. What the fold took is not: its marker
            # stays, and once past its deadline its resolution looks for the token. A
            # cas whose reply was lost may have made the entry all the same, and its
            # resolver would look for the token too: it stays pinned, its shard
            # reserved, until this process sees the stash without it (found by the
            # simulator, seed 30826: released, a transform of ours replaced the slot,
            # and the entry's resolution wrote the write a second time).
            if folded or exc.maybe_applied:
                ctx.picker.keep(token)
            else:
                ctx.picker.release(token)
            step = outcomes.when_memcache_fails(Step.KEEP_UNSURE, maybe_applied=exc.maybe_applied)
            assert step is Step.OUTCOME_UNKNOWN
            if delta:
                raise IncrementOutcomeUnknown(ctx.name, delta, exc) from cause
            # A fold alone (write_pending): no caller's increment is in doubt, only the
            # fold, which its marker settles. Say why it failed, as _after_failure does
            # for a fold alone.
            fold_alone_failed = True
        else:
            fold_alone_failed = False
        if fold_alone_failed:
            raise cause
        ctx.picker.keep(token)
        ctx.stats.add(unsure=1)
        log.warning(
            "counter %r: shard write's outcome unknown after retries (%s); %d kept in "
            "delayed_incr as unsure until a transaction on shard %d resolves it",
            ctx.name,
            cause,
            amount,
            shard,
        )


def stash_or_raise(ctx: CounterContext, amount: int, cause: BaseException) -> Steps[None]:
    """Keep ``amount``, which certainly did not reach a shard, in delayed_incr.

    Raises what ``core/outcomes.when_memcache_fails`` says when memcache cannot:
    IncrementNotRecorded if it refused, IncrementOutcomeUnknown if the stash's own
    write may have been applied (its reply was lost).
    """
    try:
        yield from ctx.backend.cache.steps.stashes.stash(ctx.stash_key, amount)
    except CacheUnavailable as exc:
        step = outcomes.when_memcache_fails(Step.STASH, maybe_applied=exc.maybe_applied)
        if step is Step.OUTCOME_UNKNOWN:
            raise IncrementOutcomeUnknown(ctx.name, amount, exc) from cause
        raise IncrementNotRecorded(ctx.name, amount, exc) from cause
    ctx.stats.add(stashed=1)
    log.warning(
        "counter %r: shard write failed (%s); %d kept in delayed_incr until the next write",
        ctx.name,
        cause,
        amount,
    )

"""One shard write of a plain increment, retried, and the writes that spread a total.

``ShardWriter.write`` picks a shard, writes with a transform or a transaction,
and retries under the policy of ``store/retry.py``. It returns the shard's new
state, or raises ``WriteFailed`` saying how the attempts ended
(``core/outcomes.py``), and, when an attempt may have landed, on which shard:
the caller keeps the write as an unsure entry there, and ``paths/picker.py``
keeps this process's other writers off it until the entry is resolved.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

from google.api_core import exceptions as gexc

from ..core.effects import Steps, retrying
from ..core.outcomes import Ending
from ..core.record import ShardState
from ..errors import CounterOverflowError
from ..store.retry import CONTENTION, RETRYABLE, outcome_unknown, write_policy
from ..store.shards import ShardOverflow
from .context import TRANSFORM_SHARD_LIMIT, CounterContext
from .leased import leased_shard
from .transforms import fence

log = logging.getLogger("sharded_counter")


class WriteFailed(Exception):
    """A shard write's attempts ended without landing (see ``core/outcomes.Ending``).

    ``shard`` is where an attempt of unknown outcome went (DOUBTFUL only), and
    ``transaction`` that attempt's, when it was a transform that could not be fenced
    (``paths/transforms.py``); ``__cause__`` is the last attempt's error."""

    def __init__(
        self,
        ending: Ending,
        cause: BaseException,
        shard: int | None = None,
        transaction: bytes | None = None,
    ) -> None:
        super().__init__(ending.value, cause)
        self.ending = ending
        self.shard = shard
        self.transaction = transaction
        self.__cause__ = cause


def ending_of(error: BaseException) -> Ending:
    """How a write ended whose last attempt raised ``error`` (none of unknown outcome)."""
    if isinstance(error, CounterOverflowError):
        return Ending.OVERFLOW
    if isinstance(error, RETRYABLE):
        return Ending.REFUSED
    return Ending.REJECTED


class ShardWriter:
    """The shard writes of one counter in this process."""

    def __init__(self, ctx: CounterContext) -> None:
        self.ctx = ctx

    def attempt_failed(self, exc: gexc.GoogleAPICallError) -> bool:
        """Tally one failed write attempt; returns whether it may have been applied."""
        if isinstance(exc, CONTENTION):
            self.ctx.stats.add(aborts=1)
            self.ctx.contended()
        elif isinstance(exc, RETRYABLE):
            self.ctx.stats.add(transient_errors=1)
        return outcome_unknown(exc)

    def write(self, amount: int, token: str, *, folded: int = 0) -> Steps[ShardState]:
        """Write ``amount`` to a shard, retrying per the policy; the caller pins ``token``.

        A write that folds in ``folded`` from delayed_incr goes through a
        transaction, which looks for its token first: a ``count = v`` may have
        fenced it, or a resolution written its fold part (core/stash.py). Its
        shard stays reserved until the caller settles the fold.

        After contention (nothing was written) a retry goes to another shard.
        After a failure whose outcome is unknown (a timeout, a dropped
        connection: the commit may have landed) it goes to the same shard, in a
        transaction that first looks for this write's token there. Raises
        ``WriteFailed`` when the retries run out or an error no retry cures
        comes back.
        """
        ctx = self.ctx
        unsure_of: int | None = None  # the shard an unknown-outcome attempt went to
        index: int | None = None  # the shard the attempt running now went to

        def write_there(there: int, alone: bool, transform: bool) -> Steps[ShardState]:
            nonlocal index
            # Noted before its transaction begins: from here on, a write of ours to
            # that shard waits for it (W12).
            if (
                unsure_of is None
                and alone
                and transform
                and ctx.picker.transform_claimed(token, there)
            ):
                try:
                    transaction = yield from ctx.backend.store.begin()
                except BaseException:
                    ctx.picker.transform_over(token)  # nothing was sent to the shard
                    raise
                index = there
                state = yield from self.add_with_transform(there, amount, token, transaction)
            else:
                index = there
                state = yield from self.add_in_transaction(there, amount, token, folded)
            if folded and state.shard_id.startswith("i"):
                # Still held: no transform of this process replaces the token
                # there before the fold is settled.
                ctx.picker.reserve(token, int(state.shard_id[1:]))
            return state

        def attempt() -> Steps[ShardState]:
            nonlocal unsure_of, index
            index = None
            try:
                # Inside the attempt: the first call may probe the backend.
                yield from ctx.backend.probed()
                transform = not folded and ctx.transform_fits(amount)
                # A transaction reads its shard: writers of other processes on it would
                # abort it, or on Firestore wait on its lock, so it leases the shard.
                # Before it lands there, any transform of ours to that shard is over
                # or fenced (W6', W12: paths/transforms.py), this write's own included.
                state = yield from leased_shard(
                    ctx,
                    ctx.shards,
                    lambda there, alone: write_there(there, alone, transform),
                    prefer=unsure_of,
                    lease=not transform,
                )
            except gexc.GoogleAPICallError as exc:
                # Retried only when RETRYABLE; any error may leave the outcome unknown
                # (a cancelled call, say), retried or not.
                unknown = self.attempt_failed(exc)
                if unknown and unsure_of is None and index is not None:
                    unsure_of = index
                    # Keep this process's other writers off that shard until the write
                    # is resolved: a transform of theirs would replace the token in
                    # this process's slot.
                    ctx.picker.reserve(token, index)
                raise
            ctx.shard_written()
            if not folded:
                ctx.picker.release(token)
            return state

        try:
            state: ShardState = yield from retrying(write_policy(ctx.settings), attempt)
        except Exception as exc:
            if unsure_of is not None and not isinstance(exc, CounterOverflowError):
                unfenced = ctx.picker.transform_left_unfenced(token)
                raise WriteFailed(Ending.DOUBTFUL, exc, unsure_of, unfenced) from exc
            if isinstance(exc, (CounterOverflowError, gexc.GoogleAPICallError)):
                raise WriteFailed(ending_of(exc), exc) from exc
            raise
        return state

    def add_with_transform(
        self, index: int, amount: int, token: str, transaction: bytes
    ) -> Steps[ShardState]:
        """One transform write, committed in ``transaction``. When its outcome is
        unknown, the transaction is fenced before the error is raised (W6',
        paths/transforms.py), so the retry may look for the token; a fence that
        fails leaves the transform to whoever writes that shard next, or, when the
        write gives up, to the resolver of its unsure entry."""
        ctx = self.ctx
        ctx.picker.transform_sent(token, index, transaction)  # the transaction, noted now
        over = False  # answered, or fenced: it landed, or never will
        try:
            state: ShardState = yield from ctx.backend.store.add_with_transform(
                ctx.name, index, amount, token=token, transaction=transaction
            )
            over = True
        except gexc.GoogleAPICallError as exc:
            over = not outcome_unknown(exc)  # refused: it never landed, and never will
            if not over:
                try:
                    yield from fence(ctx, transaction)
                    over = True
                except gexc.GoogleAPICallError as failure:
                    log.debug("counter %r: could not fence a transform: %s", ctx.name, failure)
            raise
        finally:
            # Not known to be over (no fence answered, or the call was cancelled): it
            # may still land, and whoever next writes that shard fences it first.
            if over:
                ctx.picker.transform_over(token)
            else:
                ctx.picker.transform_left(token)
        return state

    def add_in_transaction(
        self, first: int, amount: int, token: str = "", folded: int = 0
    ) -> Steps[ShardState]:
        """One transaction write, to ``first`` or, when it is full, any shard with room;
        when none has, the total plus ``amount`` is spread over all of them."""
        ctx = self.ctx
        store, lazy, limit = ctx.backend.store, ctx.backend.lazy_begin, ctx.shard_limit
        others = [i for i in random.sample(range(ctx.shards), ctx.shards) if i != first]
        # The token goes along everywhere: a fence (core/stash.py) is on every shard.
        pinned = ctx.picker.pinned()
        for index in [first, *others]:
            try:
                state: ShardState = yield from store.add_in_transaction(
                    ctx.name,
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
            return state
        try:
            states = yield from store.rewrite(
                ctx.name,
                ctx.shards,
                lazy_begin=lazy,
                limit=limit,
                adding=amount,
                token=token,
                folded=folded,
                pinned=pinned,
            )
        except ValueError:
            raise CounterOverflowError(
                f"counter {ctx.name!r} cannot take {amount}: its {ctx.shards} shards "
                f"would pass {limit} each; nothing was written"
            ) from None
        yield from ctx.backend.cache.steps.records.merge(ctx.record_key, ctx.stash_key, states[1:])
        return states[0]

    def rewrite(
        self, target: Callable[[int], int], fence: Sequence[str] = (), token: str = ""
    ) -> Steps[list[ShardState]]:
        """Spread ``target(total)`` over the shards in one transaction, retried until
        ``retry_deadline`` (every concurrent increment can abort it)."""
        ctx = self.ctx
        yield from ctx.backend.probed()
        states: list[ShardState] = yield from retrying(
            write_policy(ctx.settings, until_deadline=True),
            ctx.backend.store.rewrite,
            ctx.name,
            ctx.shards,
            target,
            lazy_begin=ctx.backend.lazy_begin,
            limit=ctx.shard_limit,
            fence=fence,
            token=token,
        )
        return states

    def rebalance_if_needed(self, state: ShardState) -> Steps[None]:
        """After a transform result past the transform limit, spread the total evenly
        again, so no shard sits there."""
        ctx = self.ctx
        if abs(state.value) <= TRANSFORM_SHARD_LIMIT or ctx.backend.write_mode != "transform":
            return
        try:
            states = yield from self.rewrite(lambda total: total)
        except ValueError:
            ctx.picker.transforms_unsafe = True
            log.warning(
                "counter %r is too large for transform writes; this process writes it "
                "through transactions from now on",
                ctx.name,
            )
            return
        except (CounterOverflowError, gexc.GoogleAPICallError) as exc:
            log.warning("could not rebalance counter %r: %s", ctx.name, exc)
            return
        ctx.stats.add(rebalances=1)
        yield from ctx.backend.cache.steps.records.merge(ctx.record_key, ctx.stash_key, states)

"""Resolving unsure writes: writes whose outcome stayed unknown, kept in delayed_incr.

Whoever sees them first (a read or a write of the counter, in any process)
claims them with one ``cas`` and runs one token-checked transaction for each:
on its shard, which adds the amount unless the shard holds the write's token
already; or, for the fold part of a writer that vanished mid-fold, over every
shard, which also fences the fold token (``core/stash.py``). What fails stays
unsure for a later try, and this process then waits ``RESOLVE_PAUSE`` before
the next, so reads and writes do not each pay a timeout while Datastore is down.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time

from google.api_core import exceptions as gexc

from ..core.effects import Steps, retrying
from ..core.record import ShardState
from ..core.stash import ANY_SHARD, Unsure
from ..core.tokens import folding_write
from ..errors import CacheUnavailable
from ..store.retry import outcome_unknown, write_policy
from ..store.shards import ShardOverflow
from .context import CounterContext
from .transforms import after_own_transforms, fence

log = logging.getLogger("sharded_counter")

RESOLVE_PAUSE = 1.0


class UnsureResolver:
    """Resolves the unsure writes of one counter, from this process."""

    def __init__(self, ctx: CounterContext) -> None:
        self.ctx = ctx

    def resolve(self, *, look: bool = False) -> Steps[bool]:
        """Resolve the unsure writes of this counter, if there are any and it is time.

        ``look`` asks memcache even when this process saw none lately. Returns
        whether anything was resolved. Never raises.
        """
        ctx = self.ctx
        cache, picker = ctx.backend.cache.steps, ctx.picker
        if not ctx.backend.cache.enabled or not picker.resolution_due():
            return False
        own = picker.kept()  # before the claim reads the stash: so each was in it by then
        if not (look or own or cache.unsure_seen(ctx.stash_key)):
            return False
        claim = secrets.token_hex(6)
        try:
            before, claimed = yield from cache.unsure.claim_unsure(
                ctx.stash_key, claim, ctx.fold_deadline()
            )
        except CacheUnavailable:
            picker.resolution_failed(RESOLVE_PAUSE)
            return False
        for token in own:
            if not before.mentions(token):
                # Resolved elsewhere, replaced by a set, or lost with delayed_incr while
                # a resolver had claimed it: kept for a claim's lifetime (``linger``).
                picker.linger(token, ctx.fold_deadline() - time.time())
        resolved = failed = False
        for token, entry in claimed.items():
            if failed:  # Datastore failed on an earlier one: try them all later
                yield from cache.unsure.finish_unsure(ctx.stash_key, token, claim, written=False)
                continue
            try:
                states = yield from self._resolve_one(token, entry)
            except ShardOverflow as full:
                # Not there (the token was looked for first), and that shard is full.
                yield from cache.unsure.unsure_to_pending(ctx.stash_key, token, claim, full.delta)
                picker.release(token)
                continue
            except (gexc.GoogleAPICallError, ValueError) as exc:
                # ValueError: a fold part that no spread of the total can take.
                log.warning("counter %r: could not resolve an unsure write: %s", ctx.name, exc)
                if entry.shard != ANY_SHARD and outcome_unknown(exc):
                    # Its write may have landed, with the token in this process's slot,
                    # where the next resolution looks: keep it there (see below).
                    self._keep_looked_for(token, entry.shard)
                yield from cache.unsure.finish_unsure(ctx.stash_key, token, claim, written=False)
                picker.resolution_failed(RESOLVE_PAUSE)
                failed = True
                continue
            if (yield from cache.unsure.finish_unsure(ctx.stash_key, token, claim, written=True)):
                picker.release(token)
            elif entry.shard != ANY_SHARD:
                # The entry is still in delayed_incr (a set claimed it meanwhile, or the
                # backlog ends it later), and whoever resolves it then looks for its
                # token, now in this process's slot on that shard.
                self._keep_looked_for(token, entry.shard)
            ctx.stats.add(resolved=1)
            yield from cache.records.merge(ctx.record_key, ctx.stash_key, states)
            resolved = True
        return resolved

    def _keep_looked_for(self, token: str, shard: int) -> None:
        """A resolution of ours put ``token`` in this process's slot on ``shard`` (or may
        have), while delayed_incr still names it: keep it there, pinned, with no
        transform of ours on that shard, until this process sees the entry gone (the
        next ``resolve`` releases it). Found by the simulator: a transform replaced the
        slot, and the next resolution wrote the write a second time."""
        self.ctx.picker.keep(token)
        self.ctx.picker.reserve(token, shard)

    def _holding(self, shard: int) -> contextlib.AbstractContextManager[object]:
        """Hold ``shard`` as a write of this process does, while a resolution writes it:
        no transform of this process goes there meanwhile, which would replace the
        token the resolution puts in its slot (W12; found by the simulator, seed
        10595: a resolution and a transform of one process on one shard, both
        replies lost, the transform landing last)."""
        return self.ctx.picker.pick(self.ctx.shards, prefer=shard)

    def _resolve_one(self, token: str, entry: Unsure) -> Steps[list[ShardState]]:
        """Add the unsure write ``token`` unless the shards show it (core/stash.py)."""
        ctx = self.ctx
        yield from ctx.backend.probed()
        store, lazy = ctx.backend.store, ctx.backend.lazy_begin
        if entry.shard != ANY_SHARD:
            with self._holding(entry.shard):
                # Its token is looked for only once nothing of it can land any more
                # (W6'): a transform its writer could not fence is fenced here first.
                if entry.transaction:
                    yield from fence(ctx, entry.transaction)
                yield from after_own_transforms(ctx, entry.shard)
                state = yield from store.add_in_transaction(
                    ctx.name,
                    entry.shard,
                    entry.amount,
                    lazy_begin=lazy,
                    limit=ctx.shard_limit,
                    token=token,
                    folded=entry.folded,
                    pinned=ctx.picker.pinned(),
                )
            return [state]
        # A vanished writer's fold part: its write may be on any shard. One transaction
        # reads them all; it adds the amount only if the write's token is on none of
        # them, and fences the fold token on every one, so the writer, if it wakes,
        # writes only its own delta. Retried: every shard write aborts it meanwhile.
        writer = folding_write(token)
        if writer is None:
            raise ValueError(f"unsure entry {token!r} for any shard is not a fold part")
        states: list[ShardState] = yield from retrying(
            write_policy(ctx.settings),
            store.rewrite,
            ctx.name,
            ctx.shards,
            lazy_begin=lazy,
            limit=ctx.shard_limit,
            adding=entry.amount,
            token=writer,
            folded=entry.amount,
            fence=[token],
        )
        return states

"""``count = v``: one transaction rewrites every shard, coordinated with delayed_incr.

The set puts its marker on the stash first (one ``cas`` that takes what is
pending, claims the unsure writes and fences the folds in flight,
``core/stash.py``), then rewrites the shards with those tokens in their fence,
then ends its marker as landed or not. Writers of the counter in this process
wait meanwhile: on an optimistic engine each of their commits would abort it.
"""

from __future__ import annotations

import logging

from ..core.bounds import spread
from ..core.effects import Steps
from ..core.stash import Stash
from ..core.tokens import new_token
from ..core.validation import check_value
from ..errors import CacheUnavailable
from .context import CounterContext
from .shard_writes import ShardWriter

log = logging.getLogger("sharded_counter")


class Setter:
    """``count = v`` for one counter, from this process."""

    def __init__(self, ctx: CounterContext, shards: ShardWriter) -> None:
        self.ctx = ctx
        self.shards = shards

    def set(self, value: int) -> None:
        """Set the counter to ``value``: see the module docstring. Bad values raise
        TypeError/ValueError before anything is written."""
        ctx = self.ctx
        value = self.checked(value)
        with ctx.combiner.exclusive():
            ctx.run(self.set_now(value))

    def checked(self, value: int) -> int:
        """``value`` if the counter can be set to it; raises TypeError/ValueError if not."""
        ctx = self.ctx
        value = check_value(value, ctx.shards)
        spread(value, ctx.shards, ctx.shard_limit)  # refuse what cannot fit, early
        return value

    def set_now(self, value: int) -> Steps[None]:
        """The set itself, with this process's writers of the counter held (the caller
        holds them)."""
        ctx = self.ctx
        cache = ctx.backend.cache.steps
        token = new_token()
        coordinated, taken = False, Stash()
        if ctx.backend.cache.enabled:
            # The marker outlives the set's own time limits (its transaction, then one
            # call to end it), so only a setter that died leaves it to expire.
            set_over = ctx.fold_deadline() + ctx.settings.rpc_timeout
            # CacheUnavailable (memcache failed, or another set held the key past our
            # deadline) goes to the caller with nothing written: a set that went ahead
            # without taking what delayed_incr holds would leave it to be added after
            # the set, once memcache answers again (I6; found by the simulator). A
            # marker whose reply was lost expires as "not landed", changing nothing.
            taken = yield from cache.sets.begin_set(ctx.stash_key, token, set_over)
            coordinated = True
        # The set's own token goes in the fence too: what it took is settled by it, and
        # a retry after an attempt whose outcome is unknown finds it and writes nothing.
        fence = [token, *taken.fence]
        try:
            states = yield from self.shards.rewrite(
                lambda _current: value, fence=fence, token=token
            )
        except BaseException:
            if coordinated:
                yield from self.end_set(token, landed=False)
            raise
        if coordinated:
            yield from self.end_set(token, landed=True)
        yield from cache.records.merge(ctx.record_key, ctx.stash_key, states)

    def end_set(self, token: str, *, landed: bool) -> Steps[None]:
        ctx = self.ctx
        try:
            yield from ctx.backend.cache.steps.sets.end_set(ctx.stash_key, token, landed=landed)
        except CacheUnavailable as exc:
            # Nothing is lost: the marker's deadline ends the set as "not landed", and
            # the shards' fence then tells the resolution what the set replaced.
            log.warning(
                "counter %r: memcache failed while ending a set (%s); delayed_incr settles "
                "it when the set's marker expires",
                ctx.name,
                exc,
            )

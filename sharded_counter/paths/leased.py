"""A shard for one transaction write, free in this process and, by lease, in others.

``ShardPicker`` keeps this process's writers on different shards; a lease in
memcache (cache/leases.py) keeps writers of other processes off the shard
too, as far as memcache can tell. A shard another process leased is passed
over for another free one, a few times; then the write goes where it is
(leases are hints: contention is slower, never wrong).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

from ..core.effects import Steps
from ..core.keys import lease_key
from .context import CounterContext
from .transforms import after_own_transforms

T = TypeVar("T")

# How many shards a write tries to lease before it writes where it is.
_TRIES = 3


def leased_shard(
    ctx: CounterContext,
    shards: int,
    body: Callable[[int, bool], Steps[T]],
    prefer: int | None = None,
    *,
    lease: bool = True,
) -> Steps[T]:
    """Pick a shard as ``ShardPicker.pick`` does and, with ``lease``, lease it; run
    ``body(index, alone)``, ``alone`` saying whether the write has the shard to itself
    in this process, and give both back after. ``prefer``, when given, is taken as it
    is, with no lease asked."""
    leases = ctx.backend.cache.steps.leases
    with contextlib.ExitStack() as held:
        picked: tuple[int, bool] | None = None
        leased = None
        for attempt in range(_TRIES):
            # Shards passed over stay held here until the write ends, so the picker
            # does not hand them out again meanwhile.
            picked = held.enter_context(ctx.picker.pick(shards, prefer=prefer))
            index, alone = picked
            if not lease or prefer is not None or not alone:
                break  # asked for, or every shard is busy here already: no choice left
            key = lease_key(ctx.record_key, index)
            granted = yield from leases.take(key)
            if granted is None:
                break  # memcache cannot say: go ahead
            if granted:
                leased = key
                break
            ctx.stats.add(lease_misses=1)
            ctx.contended()
            if attempt == _TRIES - 1:
                break
        assert picked is not None
        yield from after_own_transforms(ctx, picked[0])
        try:
            result: T = yield from body(*picked)
        finally:
            if leased is not None:
                yield from leases.end(leased)
        return result


def leased_lenders(
    ctx: CounterContext,
    choose: Callable[[set[int]], list[int] | None],
    body: Callable[[list[int] | None], Steps[T]],
) -> Steps[T]:
    """The lenders of a borrow, leased: ``choose(avoid)`` picks them, keeping off ``avoid``
    where it can. Shards this process is writing are avoided from the start; shards
    another process leased, on a second choice. Runs ``body`` with what ``choose``
    returned last, and ends the leases after."""
    leases = ctx.backend.cache.steps.leases
    avoid = ctx.picker.busy()
    leased: list[str] = []
    try:
        lenders = choose(avoid)
        for _ in range(2):
            refused = set()
            for index in lenders or ():
                key = lease_key(ctx.record_key, index)
                if key in leased:
                    continue
                granted = yield from leases.take(key)
                if granted:
                    leased.append(key)
                elif granted is False:
                    refused.add(index)
            if not refused:
                break
            ctx.stats.add(lease_misses=len(refused))
            ctx.contended()
            avoid |= refused
            lenders = choose(avoid)
        result: T = yield from body(lenders)
    finally:
        for key in leased:
            yield from leases.end(key)
    return result

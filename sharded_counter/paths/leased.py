"""A shard for one transaction write, free in this process and, by lease, in others.

``ShardPicker`` keeps this process's writers on different shards; a lease in
memcache (cache/leases.py) keeps writers of other processes off the shard
too, as far as memcache can tell. A shard another process leased is passed
over for another free one, a few times; then the write goes where it is
(leases are hints: contention is slower, never wrong).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from ..core.keys import lease_key
from .context import CounterContext

# How many shards a write tries to lease before it writes where it is.
_TRIES = 3


@contextlib.contextmanager
def leased_shard(
    ctx: CounterContext, shards: int, prefer: int | None = None, *, lease: bool = True
) -> Iterator[tuple[int, bool]]:
    """Pick a shard as ``ShardPicker.pick`` does and, with ``lease``, lease it; yield the
    index and whether the write has it to itself in this process. ``prefer``, when
    given, is taken as it is, with no lease asked."""
    cache = ctx.backend.cache
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
            granted = cache.lease(key)
            if granted is None:
                break  # memcache cannot say: go ahead
            if granted:
                leased = key
                break
            ctx.stats.add(lease_misses=1)
            if attempt == _TRIES - 1:
                break
        assert picked is not None
        try:
            yield picked
        finally:
            if leased is not None:
                cache.end_lease(leased)


@contextlib.contextmanager
def leased_lenders(
    ctx: CounterContext, choose: Callable[[set[int]], list[int] | None]
) -> Iterator[list[int] | None]:
    """The lenders of a borrow, leased: ``choose(avoid)`` picks them, keeping off ``avoid``
    where it can. Shards this process is writing are avoided from the start; shards
    another process leased, on a second choice. Yields what ``choose`` returned last."""
    cache = ctx.backend.cache
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
                granted = cache.lease(key)
                if granted:
                    leased.append(key)
                elif granted is False:
                    refused.add(index)
            if not refused:
                break
            ctx.stats.add(lease_misses=len(refused))
            avoid |= refused
            lenders = choose(avoid)
        yield lenders
    finally:
        for key in leased:
            cache.end_lease(key)

"""``AsyncCounter``: ``Counter`` for asyncio, on the same protocol and the same data.

::

    await increment(n)     -> aio/combiner.py: alone, or in a group of tasks' increments
                           -> paths/writes.py: the steps ``Counter`` runs, driven by
                              aio/shell.py (grpc.aio, emcache)
    await get_count()      -> paths/reads.py
    await set_count(v)     -> paths/sets.py
    await delete()         -> store/shards.py and the cache tier

Every path is the same steps object the blocking ``Counter`` drives (see
core/effects.py), so the two count the same counter at once, from threads and
tasks of one process or from different processes, exactly.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

from google.api_core import exceptions as gexc
from google.cloud import datastore

from ..core.outcomes import Step
from ..core.validation import check_delta, check_idempotency_key, check_value
from ..errors import DatastoreUnavailable, IncrementOutcomeUnknown
from ..paths.bounds_guard import bounds_look_due, look_for_bounds
from ..paths.context import TRANSFORM_MAX_DELTA
from ..paths.reads import read_many
from ..paths.stats import WriteStats
from ..paths.wiring import OUTCOME_OF_STEP, CounterFacade, ShardsOption
from ..store.keyed import MAX_KEYS_PER_WRITE
from ..telemetry import telemetry
from .backend import AsyncBackend, async_backend_for, finish_in_background

__all__ = ["AsyncCounter"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _datastore_failures_as_ours(
    method: Callable[_P, Awaitable[_R]],
) -> Callable[_P, Awaitable[_R]]:
    """store/retry.py's ``datastore_failures_as_ours`` for coroutines."""

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except gexc.GoogleAPICallError as exc:
            raise DatastoreUnavailable(
                f"{method.__name__} failed at Datastore ({type(exc).__name__}): {exc}"
            ) from exc

    return wrapper


class AsyncCounter(CounterFacade):
    """A sharded counter for asyncio code: ``Counter``'s options, storage and guarantees.

    ``AsyncCounter('hits')`` connects from the environment, as ``Counter`` does;
    keyword arguments override any option of ``Settings``, and a subclass may set
    them as class attributes (``shards = 20``). ``datastore_client`` names the
    project, database, namespace and credentials to use (its own blocking channel
    is not used: calls go over a ``grpc.aio`` channel to the same endpoint).
    Needs the ``aio`` extra (``emcache``). Several memcached servers fail over as
    the blocking cluster client does (aio/routing.py).
    """

    shards: int = ShardsOption()  # type: ignore[assignment]  # read as an int
    """The number of shards new increments are spread over (as ``Counter.shards``)."""

    def __init__(
        self,
        name: str,
        *,
        datastore_client: datastore.Client | None = None,
        **options: Any,
    ) -> None:
        # As Counter: connected on the first call in each process (and after reconnect()).
        super().__init__(name, options, datastore_client, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shards={self.shards})"

    @property
    def shards_in_use(self) -> int:
        """How many shards this process spreads new increments over now (as
        ``Counter.shards_in_use``: adaptive sharding)."""
        return self._ctx.shards

    @property
    def stats(self) -> WriteStats:
        """What this counter's writes did, in this process (shared with ``Counter``
        objects of the same name only through the store, not these figures)."""
        return self._ctx.stats

    async def _loop_backend(self) -> AsyncBackend:
        return async_backend_for(self._ctx.backend, self.settings)

    async def _refuse_if_bounded(self, shell: AsyncBackend) -> None:
        """``CounterIsBounded`` for a ``BoundedCounter``'s name, as ``Counter`` does."""
        ctx = self._ctx
        seen = bounds_look_due(ctx)
        if seen is not None:
            await shell.shell.run(look_for_bounds(ctx, seen))

    # -- writing ----------------------------------------------------------------

    async def increment(self, delta: int = 1, *, idempotency_key: str | None = None) -> None:
        """Add ``delta`` (any int64, negative to decrement) to the counter.

        Returns, and raises, as ``Counter.increment`` does: once the increment is
        counted (its shard write committed, or it is kept in ``delayed_incr``);
        ``IncrementNotRecorded`` when it certainly was not; ``IncrementOutcomeUnknown``
        when it may have been; ``CounterOverflowError`` and ``TypeError`` /
        ``ValueError`` with nothing written.

        ``idempotency_key`` works as for ``Counter.increment``: the first call with
        that key on this counter counts ``delta``, every later one (from any task,
        thread or process, blocking or asyncio) counts nothing, for at least
        ``idempotency_ttl`` seconds; a keyed increment is never stashed, so
        retrying it with the same key is always safe.

        Cancelling the task that awaits it does not stop the increment: it runs
        to its end in the background (a write half done would otherwise leave
        its outcome in doubt), and counts or fails just as it would have. A
        cancelled increment is therefore counted once or not at all, and the
        caller is not told which.
        """
        delta = check_delta(delta)
        key = None if idempotency_key is None else check_idempotency_key(idempotency_key)
        if not delta and key is None:
            return
        task = asyncio.ensure_future(self._increment_now(delta, key))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            finish_in_background(task)
            raise

    async def _increment_now(self, delta: int, key: str | None) -> None:
        started = time.perf_counter()
        outcome = "not_recorded"
        try:
            paths = self._paths
            shell = await self._loop_backend()
            await self._refuse_if_bounded(shell)
            combiner = shell.combiner((id(paths.ctx.backend), paths.ctx.name, self.settings))

            async def write(amount: int) -> Step:
                return await shell.shell.run(paths.writes.apply(amount))

            async def write_keyed(keys: dict[str, int]) -> Mapping[str, BaseException]:
                return await shell.shell.run(paths.keyed.write(keys))

            if key is not None:
                await combiner.run_keyed(
                    key,
                    delta,
                    write_keyed,
                    limit=self.settings.max_concurrent_writes,
                    eager=not self.settings.group_commit,
                    max_total=TRANSFORM_MAX_DELTA,
                    max_keys=MAX_KEYS_PER_WRITE,
                )
                outcome = OUTCOME_OF_STEP[Step.ACKNOWLEDGE]  # written, or it raised
                return
            step = await combiner.run(
                delta,
                write,
                limit=self.settings.max_concurrent_writes,
                eager=not self.settings.group_commit,
                max_total=TRANSFORM_MAX_DELTA,
            )
            outcome = OUTCOME_OF_STEP[Step.ACKNOWLEDGE if step is None else step]
        except IncrementOutcomeUnknown:
            outcome = "outcome_unknown"
            raise
        finally:
            telemetry().increment_done(outcome, time.perf_counter() - started)

    # -- reading ----------------------------------------------------------------

    @_datastore_failures_as_ours
    async def get_count(self, nocache: bool = False) -> int:
        """The counter's total, as ``Counter.get_count``."""
        paths = self._paths
        shell = await self._loop_backend()
        return await shell.shell.run(paths.reader.total(nocache=nocache))

    @classmethod
    @_datastore_failures_as_ours
    async def get_counts(
        cls, names: Iterable[str], *, nocache: bool = False, **options: Any
    ) -> dict[str, int]:
        """Totals of many counters at once, by name, as ``Counter.get_counts``."""
        counters = [cls(name, **options) for name in dict.fromkeys(names)]
        if not counters:
            return {}
        shell = await counters[0]._loop_backend()
        return await shell.shell.run(read_many([c._ctx for c in counters], nocache=nocache))

    # -- setting and deleting ---------------------------------------------------------

    @_datastore_failures_as_ours
    async def set_count(self, value: int) -> None:
        """Set the counter to ``value``, as ``Counter.set_count``: one transaction over
        every shard; increments of this counter in this event loop wait for it. Raises
        as ``Counter.set_count`` does (``CacheUnavailable`` with nothing written when
        memcache cannot take the stash)."""
        value = check_value(value, self.shards)  # bad input: before any call
        paths = self._paths
        shell = await self._loop_backend()
        await self._refuse_if_bounded(shell)
        await shell.shell.run(paths.ctx.backend.probed())  # checked() reads the engine's limit
        value = paths.setter.checked(value)
        combiner = shell.combiner((id(paths.ctx.backend), paths.ctx.name, self.settings))
        async with combiner.exclusive():
            await shell.shell.run(paths.setter.set_now(value))

    @_datastore_failures_as_ours
    async def delete(self) -> int:
        """Delete every shard, the cached total and any pending stash, as
        ``Counter.delete``; returns the number of shards deleted."""
        ctx = self._ctx
        shell = await self._loop_backend()
        cache = ctx.backend.cache
        if cache.enabled:
            await shell.shell.run(cache.steps.forget(ctx.stash_key))
        removed = await shell.shell.run(ctx.backend.store.delete_all(self.name))
        if cache.enabled:
            # After the shards: a reader refilling meanwhile must not outlive them.
            await shell.shell.run(cache.steps.forget(ctx.record_key))
        return removed

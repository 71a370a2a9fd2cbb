"""What every path of one counter works with: its name, settings, backends and keys.

A ``Counter`` makes one ``CounterContext`` and hands it to each of its paths
(writes, keyed writes, resolutions, sets, reads), so none of them reaches into
another object's attributes, and a batch read can work on many counters
through their contexts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TypeVar

from ..core import outcomes
from ..core.effects import Steps
from ..core.keys import cache_keys
from ..core.validation import INT64_MAX
from ..settings import Settings
from .backend import Backend
from .combiner import WriteCombiner, combiner_for
from .picker import ShardPicker, picker_for
from .stats import WriteStats

# The transform path cannot see a shard's value before adding to it, and the
# server saturates at the int64 edge instead of failing. So where transforms
# are used a shard holds at most 2**62 (sets and transaction writes keep to
# that), transform deltas stay under 2**32, and a transform result past 2**62
# spreads the total evenly again, or, when even that cannot bring the shards
# back under, sends this process's writes of the counter through transactions.
# A shard could then only saturate after 2**30 further transform writes that
# all missed both signals.
TRANSFORM_MAX_DELTA = 2**32
TRANSFORM_SHARD_LIMIT = 2**62
# The longest this process's writers hold back, in all, for one count = v of another
# process (see CacheTier.wait_out_set); only a set that died waits it out in full.
SET_WAIT_CAP = 2.0

T = TypeVar("T")

log = logging.getLogger("sharded_counter")


@dataclasses.dataclass(frozen=True)
class CounterContext:
    """One counter as its paths see it."""

    name: str
    settings: Settings
    backend: Backend
    record_key: str  # memcache: the cached record
    stash_key: str  # memcache: delayed_incr
    picker: ShardPicker
    combiner: WriteCombiner
    stats: WriteStats
    grows: bool = True  # adaptive sharding (growth.py); a bounded counter keeps its layout

    @classmethod
    def make(
        cls, name: str, settings: Settings, backend: Backend, *, grows: bool = True
    ) -> CounterContext:
        scope = backend.store.scope
        record_key, stash_key = cache_keys(settings.key_prefix, scope, name)
        return cls(
            name=name,
            settings=settings,
            backend=backend,
            record_key=record_key,
            stash_key=stash_key,
            picker=picker_for(scope, name),
            combiner=combiner_for(id(backend), scope, settings, name),
            stats=WriteStats(),
            grows=grows,
        )

    def run(self, steps: Steps[T]) -> T:
        """Carry out ``steps`` in this thread (the blocking shell, paths/shell.py)."""
        return self.backend.shell.run(steps)

    @property
    def shards(self) -> int:
        """The number of shards new increments are spread over: ``shards``, or more
        while this process's writes meet contention (growth.py)."""
        if not self.grows:
            return self.settings.shards
        return self.picker.growth.in_use(self.settings.shards, self.settings.max_shards)

    def contended(self) -> None:
        """A write met another writer: an abort, or a shard another process leased."""
        self.picker.growth.contended()

    def shard_written(self, **tallies: int) -> None:
        """A shard write committed: tally it, and let adaptive sharding count it."""
        self.stats.add(writes=1, **tallies)
        if not self.grows:
            return
        settings = self.settings
        grown = self.picker.growth.wrote(settings.shards, settings.max_shards)
        if grown is not None:
            log.info(
                "counter %r: this process now spreads its writes over %d shards",
                self.name,
                grown,
            )

    @property
    def shard_limit(self) -> int:
        """The most one shard may hold: 2**62 where this counter writes with transforms
        (see above), else the whole int64 range."""
        return TRANSFORM_SHARD_LIMIT if self.backend.write_mode == "transform" else INT64_MAX

    def transform_fits(self, amount: int) -> bool:
        """May ``amount`` go as one transform write (no read, no transaction)?"""
        return (
            self.backend.write_mode == "transform"
            and abs(amount) <= TRANSFORM_MAX_DELTA
            and not self.picker.transforms_unsafe
        )

    def fold_deadline(self) -> float:
        """When a fold begun now is over for sure (core/outcomes.py)."""
        return outcomes.fold_deadline(
            time.time(),
            retry_deadline=self.settings.retry_deadline,
            rpc_timeout=self.settings.rpc_timeout,
        )

"""Every path of one counter in this process, made on its first call here.

``Counter`` and ``AsyncCounter`` hold a ``PerProcess`` of ``CounterPaths``:
nothing is connected when a counter is made, and a counter made before a
fork (a module-level one under gunicorn ``--preload``) gets paths of its own
in each child, over the child's own clients, picker and combiner, on its
first call there.
"""

from __future__ import annotations

import dataclasses
import os

from google.cloud import datastore

from ..cache.client import MemcacheClient
from ..process import check_given_here
from ..settings import Settings
from .backend import backend_for
from .context import CounterContext
from .keyed import KeyedWrites
from .reads import Reader
from .sets import Setter
from .shard_writes import ShardWriter
from .unsure import UnsureResolver
from .writes import PlainWrites


@dataclasses.dataclass(frozen=True)
class CounterPaths:
    """The paths of one counter (docs/architecture.md), all on one ``CounterContext``."""

    ctx: CounterContext
    shards: ShardWriter
    writes: PlainWrites
    keyed: KeyedWrites
    resolver: UnsureResolver
    setter: Setter
    reader: Reader

    @classmethod
    def on(cls, ctx: CounterContext) -> CounterPaths:
        shards = ShardWriter(ctx)
        resolver = UnsureResolver(ctx)
        return cls(
            ctx=ctx,
            shards=shards,
            writes=PlainWrites(ctx, shards, resolver),
            keyed=KeyedWrites(ctx, shards, resolver),
            resolver=resolver,
            setter=Setter(ctx, shards),
            reader=Reader(ctx, resolver),
        )


class GivenClients:
    """The clients a caller passed in, and the process they were passed in (see
    ``process.check_given_here``: they are refused in a forked child)."""

    def __init__(
        self, datastore_client: datastore.Client | None, memcache_client: MemcacheClient | None
    ) -> None:
        self.datastore = datastore_client
        self.memcache = memcache_client
        self._pid = os.getpid()

    def here(self) -> GivenClients:
        """These clients, after checking that this is the process they were given in."""
        pairs = (("datastore_client", self.datastore), ("memcache_client", self.memcache))
        given = [what for what, client in pairs if client is not None]
        if given:
            check_given_here(self._pid, " and ".join(given))
        return self


def connect(
    name: str, settings: Settings, clients: GivenClients, *, grows: bool = True
) -> CounterPaths:
    """The paths of counter ``name`` in this process, over the shared backend for
    ``settings`` (or one around the caller's clients). Opens no connection."""
    given = clients.here()
    backend = backend_for(settings, given.datastore, given.memcache)
    return CounterPaths.on(CounterContext.make(name, settings, backend, grows=grows))

"""What both counter facades are built from: their paths in this process, made on the
first call here, and how their options are read.

``Counter`` and ``AsyncCounter`` derive from ``CounterFacade``, which holds a
``PerProcess`` of ``CounterPaths``: nothing is connected when a counter is
made, and a counter made before a fork (a module-level one under gunicorn
``--preload``) gets paths of its own in each child, over the child's own
clients, picker and combiner, on its first call there.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

from google.cloud import datastore

from ..cache.client import MemcacheClient
from ..core.outcomes import Step
from ..core.validation import check_name
from ..process import PerProcess, check_given_here
from ..settings import OPTION_NAMES, Settings, resolve
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


class ShardsOption:
    """``shards``: the number of shards new increments are spread over.

    On ``Counter`` (or a subclass that does not set it) it reads as the count the
    settings give (``config``, the environment, the file; 10 by default); a
    subclass sets its own with ``shards = 20``; on a counter it is the count in
    force (a keyword argument wins).
    """

    def __get__(self, counter: Any, owner: type) -> int:
        if counter is None:
            return resolve({}, class_options(owner)).shards
        shards: int = counter.settings.shards
        return shards


def class_options(cls: type) -> dict[str, Any]:
    """Options set as class attributes on a subclass of ``Counter`` (or of another class
    that holds the ``shards`` descriptor, ``AsyncCounter``): ``shards = 20``."""
    options: dict[str, Any] = {}
    # The root's own attributes (its properties and the shards descriptor) are not options.
    mro = cls.__mro__
    root = next(
        i for i, klass in enumerate(mro) if isinstance(vars(klass).get("shards"), ShardsOption)
    )
    for klass in reversed(mro[:root]):
        for option in OPTION_NAMES:
            if option in vars(klass) and vars(klass)[option] is not None:
                options[option] = vars(klass)[option]
    return options


# How a returned increment was counted, as telemetry names it (telemetry.OUTCOMES).
OUTCOME_OF_STEP = {
    Step.ACKNOWLEDGE: "written",
    Step.STASH: "stashed",
    Step.KEEP_UNSURE: "unsure",
}


class CounterFacade:
    """A named counter's options, and its paths in this process, connected on first use.

    The settings are read when the counter is made, so that a bad option fails
    there, and again when it connects (its first call in a process, and after
    ``reconnect()``), so that a counter made at import time uses the environment
    as it is when it is first used.
    """

    #: Adaptive sharding (paths/growth.py): writes spread over more shards while they
    #: meet contention, up to ``max_shards``.
    _grows_shards: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        options: dict[str, Any],
        datastore_client: datastore.Client | None,
        memcache_client: MemcacheClient | None,
    ) -> None:
        self.name = check_name(name)
        self._options = options
        self.settings: Settings = resolve(options, class_options(type(self)))
        # On the counter itself: it wins over a subclass's ``shards = 20``.
        self.shards: int = self.settings.shards
        self._clients = GivenClients(datastore_client, memcache_client)
        self._here: PerProcess[CounterPaths] = PerProcess(self._connect)

    def _connect(self) -> CounterPaths:
        self.settings = resolve(self._options, class_options(type(self)))
        self.shards = self.settings.shards
        return connect(self.name, self.settings, self._clients, grows=self._grows_shards)

    @property
    def _paths(self) -> CounterPaths:
        return self._here.get()

    @property
    def _ctx(self) -> CounterContext:
        return self._here.get().ctx

"""asyncio: ``AsyncCounter``, on the protocol and data of the blocking API.

Mirrors the blocking package: ``shell.py`` carries out the effects that the
paths' steps (``sharded_counter.paths``, written once) ask for, over
``rpc.py`` (Datastore on a ``grpc.aio`` channel) and ``memcache.py``
(``emcache``); ``combiner.py`` and ``batches.py`` group the writes of tasks
as their blocking twins group threads'; ``backend.py`` keeps one of each per
event loop. Needs the ``aio`` extra: ``pip install sharded-counter[aio]``.

May import: everything below ``tools``. Nothing of the library imports ``aio``.
"""

from .backend import aclose, drain
from .counter import AsyncCounter
from .lock import AsyncLease, alock
from .ratelimit import AsyncRateLimiter

__all__ = ["AsyncCounter", "AsyncLease", "AsyncRateLimiter", "aclose", "alock", "drain"]

"""The bench: every way of counting, side by side, on both Datastore emulators.

``sharded-counter bench`` (or ``nox -s bench``) starts its own emulators and
memcached (and a redis-server: ``--caches``), races each contender from many
writer threads (and from two processes) until a deadline, checks every total,
and writes ``bench.json`` and ``bench.png``. Each engine is measured with
memcached, then with Redis for the contenders whose targets name it
(``Contender.caches``). Start with ``runner.run``; the modules:

- ``contenders``: what is raced, and how each checks its own total;
- ``load``, ``measure``, ``procs``: timed writers, in threads or processes;
- ``micro``: the single-threaded reads (against a bare client's get, per cache) and
  buffer loops;
- ``fill``: a BoundedCounter filling its room, far from its bound and in its last 5 %;
- ``aio``: AsyncCounter from 64 tasks in one event loop against Counter from 16 threads;
- ``rpc_count``, ``cpu``: round trips counted, CPU charged to who used it;
- ``targets``, ``report``, ``chart``: verdicts, tables, JSON and the PNG.
"""

from __future__ import annotations

from .options import BenchOptions
from .runner import BenchOutcome, run

__all__ = ["BenchOptions", "BenchOutcome", "run"]

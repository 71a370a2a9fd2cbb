"""A plain ``Counter`` refuses to write a counter that has bounds stored (issue 26).

A ``BoundedCounter`` keeps its total within its bounds because every write
spends the shards' shares of them (``core/escrow.py``). A plain write does not,
so a plain ``Counter`` of the same name would break the bounds silently. Before
its first increment or set of a counter, a process looks for the counter's
``CounterBounds`` entity (``store/escrow.py``): one Datastore lookup per counter
per process, not one per write.

* No bounds: remembered while the process uses the counter (paths/registry.py
  keeps the answer for the 10,000 counters used last, and for any in use). A
  counter laid out as bounded *after* that, by another process, is not noticed
  by this one: the window docs/limits.md gives.
* Bounds: ``CounterIsBounded``, nothing written. Not remembered, so a bounded
  counter deleted meanwhile can be written plainly again.
* The lookup fails (Datastore down): the write goes on as it would have, and
  a write after ``retry_deadline`` seconds looks again (not every write: each
  look at a stalled Datastore costs up to ``rpc_timeout``). Refusing the write
  instead would turn every plain increment into a failure whenever Datastore
  is down, where today it stashes.
"""

from __future__ import annotations

import time

from google.api_core import exceptions as gexc

from ..core.effects import Steps
from ..errors import CounterIsBounded
from ..store.escrow import EscrowStore
from .context import CounterContext
from .registry import PerCounter


class _Seen:
    """Whether this process found a counter without bounds, and when it may look again
    after a lookup that failed (``time.monotonic()``)."""

    def __init__(self) -> None:
        self.unbounded = False
        self.next_look = 0.0


# Per backend, as the bounded paths' own knowledge is: a test may point one process
# at two emulators.
_seen: PerCounter[_Seen] = PerCounter(_Seen)


def bounds_look_due(ctx: CounterContext) -> _Seen | None:
    """What this process knows of ``ctx``'s counter, when it is time to look for its
    bounds (``look_for_bounds``); None when it is known to have none, or a failed look
    was too recent (see the module docstring). No I/O: a plain write checks this
    before it starts any steps."""
    seen = _seen.get((id(ctx.backend), ctx.backend.store.scope, ctx.name))
    if seen.unbounded or time.monotonic() < seen.next_look:
        return None
    return seen


def look_for_bounds(ctx: CounterContext, seen: _Seen) -> Steps[None]:
    """Raise ``CounterIsBounded`` when ``ctx``'s counter has bounds in Datastore; remember
    when it has none. As steps, so that both shells look the same way."""
    try:
        stored = yield from EscrowStore(ctx.backend.store, ctx.backend.keyed).stored_steps(ctx.name)
    except gexc.GoogleAPICallError:
        # Datastore down: the write fails or stashes as before; looked up again later.
        seen.next_look = time.monotonic() + ctx.settings.retry_deadline
        return
    if stored is not None:
        raise CounterIsBounded(ctx.name, stored.bounds)
    seen.unbounded = True


def refuse_if_bounded(ctx: CounterContext) -> None:
    """``look_for_bounds`` in this thread, when a look is due (the blocking shell)."""
    seen = bounds_look_due(ctx)
    if seen is not None:
        ctx.run(look_for_bounds(ctx, seen))

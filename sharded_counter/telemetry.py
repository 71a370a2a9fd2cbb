"""OpenTelemetry metrics and spans: recorded when ``opentelemetry-api`` is installed,
nothing at all when it is not.

The library depends on the API only, never on the SDK: an application that
configures an SDK (a ``MeterProvider`` with a reader, a ``TracerProvider``)
sees what its counters do; one that does not pays for no-op calls. Instruments
come from the global providers, which OpenTelemetry binds late, so the SDK may
be configured before or after the first counter is made. ``configure()`` takes
providers of the caller's own instead (tests, or an app with several).

What is recorded (metric names and attributes are part of the public API):

- ``sharded_counter.increments`` (counter), attribute ``outcome``: how each
  ``Counter.increment`` call ended, one of ``OUTCOMES``;
- ``sharded_counter.increment.duration`` (histogram, seconds), attribute
  ``outcome``;
- counters of events: ``sharded_counter.shard_writes`` (commits that landed),
  ``sharded_counter.retries`` (attempts lost to unavailable / deadline
  errors), ``sharded_counter.aborts`` (attempts lost to contention),
  ``sharded_counter.stash.folds`` (stashed amounts written to a shard),
  ``sharded_counter.unsure.resolutions`` (unsure writes resolved),
  ``sharded_counter.cache.hits`` and ``sharded_counter.cache.misses`` (reads of
  the cached total), ``sharded_counter.memcache.outages`` (outages begun),
  ``sharded_counter.bounded.borrows`` (a bounded counter's shard borrowed
  room from others), ``sharded_counter.lease_misses`` (a shard another
  process was writing, passed over);
- a span per Datastore call, ``Datastore/<Method>`` (our raw gRPC calls skip the
  client library's own instrumentation), with the RPC attributes of the
  semantic conventions and the error, if any.

Counter names are not attributes: an application may have millions of them.
May import: ``_version`` only.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from ._version import __version__

try:  # the API is optional: without it every call below does nothing
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised by the lean-install test
    _metrics = None  # type: ignore[assignment]
    _trace = None  # type: ignore[assignment]

#: How an increment can end (the ``outcome`` attribute).
OUTCOMES = ("written", "stashed", "unsure", "not_recorded", "outcome_unknown", "limit_reached")

#: Event name (as the write path tallies it) -> metric name.
EVENTS = {
    "writes": "sharded_counter.shard_writes",
    "transient_errors": "sharded_counter.retries",
    "aborts": "sharded_counter.aborts",
    "folded": "sharded_counter.stash.folds",
    "resolved": "sharded_counter.unsure.resolutions",
    "cache_hits": "sharded_counter.cache.hits",
    "cache_misses": "sharded_counter.cache.misses",
    "memcache_outages": "sharded_counter.memcache.outages",
    "borrows": "sharded_counter.bounded.borrows",
    "lease_misses": "sharded_counter.lease_misses",
}

_NAME = "sharded_counter"
_RPC_SERVICE = "google.datastore.v1.Datastore"


class Telemetry:
    """The instruments and tracer of one pair of providers (the global ones by default)."""

    def __init__(self, meter_provider: Any = None, tracer_provider: Any = None) -> None:
        self.enabled = _metrics is not None
        if _metrics is None or _trace is None:
            return
        meter = (
            meter_provider.get_meter(_NAME, __version__)
            if meter_provider is not None
            else _metrics.get_meter(_NAME, __version__)
        )
        self._tracer = (
            tracer_provider.get_tracer(_NAME, __version__)
            if tracer_provider is not None
            else _trace.get_tracer(_NAME, __version__)
        )
        self._increments = meter.create_counter(
            "sharded_counter.increments",
            unit="{increment}",
            description="Counter.increment calls, by how they ended",
        )
        self._duration = meter.create_histogram(
            "sharded_counter.increment.duration",
            unit="s",
            description="Time of a Counter.increment call, by how it ended",
        )
        self._events = {
            event: meter.create_counter(metric, unit="1") for event, metric in EVENTS.items()
        }
        self._outcome_attributes = {outcome: {"outcome": outcome} for outcome in OUTCOMES}
        self._rpc = _RpcAttributes()

    def increment_done(self, outcome: str, seconds: float) -> None:
        """One ``increment`` call ended as ``outcome`` after ``seconds``."""
        if not self.enabled:
            return
        attributes = self._outcome_attributes[outcome]
        self._increments.add(1, attributes)
        self._duration.record(seconds, attributes)

    def events(self, amounts: dict[str, int]) -> None:
        """Add to the event counters (names as in ``EVENTS``; others are not exported)."""
        if not self.enabled:
            return
        for event, amount in amounts.items():
            instrument = self._events.get(event)
            if instrument is not None and amount:
                instrument.add(amount)

    @contextlib.contextmanager
    def datastore_call(self, method: str) -> Iterator[None]:
        """A client span around one Datastore RPC (``method`` as in ``Commit``)."""
        if not self.enabled:
            yield
            return
        span = self._tracer.start_span(
            f"Datastore/{method}", kind=_trace.SpanKind.CLIENT, attributes=self._rpc[method]
        )
        if not span.is_recording():
            # No SDK: a non-recording span. Making it current (a context attach and
            # detach) took a call from 3 to 7 µs here, for nothing.
            span.end()
            yield
            return
        # An exception is recorded on the span and marks it as an error.
        with _trace.use_span(span, end_on_exit=True):
            yield


class _RpcAttributes(dict[str, dict[str, str]]):
    """The span attributes of each Datastore method, made once."""

    def __missing__(self, method: str) -> dict[str, str]:
        made = {"rpc.system": "grpc", "rpc.service": _RPC_SERVICE, "rpc.method": method}
        self[method] = made
        return made


_lock = threading.Lock()
_current = Telemetry()


def telemetry() -> Telemetry:
    """What the library records to now."""
    return _current


def configure(*, meter_provider: Any = None, tracer_provider: Any = None) -> None:
    """Record to these providers from now on (None: the global ones, bound late)."""
    global _current
    with _lock:
        _current = Telemetry(meter_provider, tracer_provider)

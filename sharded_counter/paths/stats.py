"""Per-counter tallies of what the write path did, for the demo, bench and logs; each
tally also goes to OpenTelemetry (``telemetry.py``) when it is installed."""

from __future__ import annotations

import dataclasses
import threading

from ..telemetry import telemetry


@dataclasses.dataclass
class WriteStats:
    writes: int = 0  # shard writes that committed
    aborts: int = 0  # attempts lost to contention
    transient_errors: int = 0  # attempts lost to unavailable / deadline errors
    stashed: int = 0  # increments that went to delayed_incr
    folded: int = 0  # stashed amounts taken and written to a shard
    unsure: int = 0  # writes kept as unsure entries: retries ran out, outcome unknown
    resolved: int = 0  # unsure entries this counter object resolved
    rebalances: int = 0  # shards moved back from the int64 edge
    keys_applied: int = 0  # idempotency keys whose increment this counter object wrote
    borrows: int = 0  # a bounded counter's shard borrowed room from others (core/escrow.py)
    lease_misses: int = 0  # shards passed over: another process leased them (cache/leases.py)
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)
        telemetry().events(amounts)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_lock"
            }

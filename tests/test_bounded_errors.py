"""Every public method of ``BoundedCounter`` fails with one of our documented errors
when Datastore does, never with a raw ``google.api_core`` one (issue 26).

Two real faults, on both engines with real memcached: a Datastore host where
nothing listens (connection refused, so nothing can land), and the emulator's JVM
SIGSTOPped (every call times out, and a commit may land after it resumes).
What docs/using.md promises for each method:

* ``increment`` (with or without a key) and ``try_increment``:
  ``IncrementNotRecorded`` (certainly not counted) or ``IncrementOutcomeUnknown``
  (maybe counted: only when a commit of the increment was sent and its reply lost);
* reads, ``count = v``, ``set_bounds``, ``bounds_in_datastore``, ``shares`` and
  ``delete``: ``DatastoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from faultkit import ReplyHoldingRelay, probe_through_relay
from google.api_core import exceptions as gexc

from sharded_counter import (
    BoundedCounter,
    DatastoreUnavailable,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
)
from sharded_counter_emulator import free_port

pytestmark = pytest.mark.backends

# A Datastore that is down: no retries worth waiting for, and quick to say so.
UNREACHABLE: dict[str, Any] = {"retry_attempts": 1, "retry_deadline": 0.5, "rpc_timeout": 1.0}
# The same backend (its rpc_timeout is part of what a backend is shared by) with the
# default retries: for the writes before the fault, which must not fail on a busy machine.
PATIENT: dict[str, Any] = {"rpc_timeout": UNREACHABLE["rpc_timeout"]}

INCREMENT_ERRORS = (IncrementNotRecorded, IncrementOutcomeUnknown)


def _set_bounds(counter: BoundedCounter) -> None:
    counter.set_bounds(maximum=10)


def _set_count(counter: BoundedCounter) -> None:
    counter.count = 2


def _read_count(counter: BoundedCounter) -> None:
    counter.get_count(nocache=True)


def _read_cached_count(counter: BoundedCounter) -> None:
    _ = counter.count


#: (what the call is, the call, what it may raise when Datastore fails)
CALLS: list[tuple[str, Callable[[BoundedCounter], object], tuple[type[Exception], ...]]] = [
    ("try_increment()", lambda c: c.try_increment(), INCREMENT_ERRORS),
    ("increment(1)", lambda c: c.increment(1), INCREMENT_ERRORS),
    ("increment(-1)", lambda c: c.increment(-1), INCREMENT_ERRORS),
    ("increment(0)", lambda c: c.increment(0), INCREMENT_ERRORS),
    ("increment(1, key)", lambda c: c.increment(1, idempotency_key="k1"), INCREMENT_ERRORS),
    ("try_increment(key)", lambda c: c.try_increment(idempotency_key="k2"), INCREMENT_ERRORS),
    ("count", _read_cached_count, (DatastoreUnavailable,)),
    ("get_count(nocache)", _read_count, (DatastoreUnavailable,)),
    ("count = v", _set_count, (DatastoreUnavailable,)),
    ("set_count(v)", lambda c: c.set_count(2), (DatastoreUnavailable,)),
    ("set_bounds", _set_bounds, (DatastoreUnavailable,)),
    ("bounds_in_datastore", lambda c: c.bounds_in_datastore(), (DatastoreUnavailable,)),
    ("shares", lambda c: c.shares(), (DatastoreUnavailable,)),
    ("verify", lambda c: c.verify(), (DatastoreUnavailable,)),
    ("delete", lambda c: c.delete(), (DatastoreUnavailable,)),
]


def _outcome(call: Callable[[BoundedCounter], object], counter: BoundedCounter) -> str:
    """What the call did: 'returned', or the name of what it raised."""
    try:
        call(counter)
    except gexc.GoogleAPICallError as exc:  # the bug: a raw backend error
        return f"raw {type(exc).__name__}"
    except Exception as exc:
        return type(exc).__name__
    return "returned"


def _expected(allowed: tuple[type[Exception], ...]) -> set[str]:
    return {kind.__name__ for kind in allowed}


#: Calls that may answer without Datastore: a cached total, and an increment of 0
#: once this process knows the stored bounds (it has nothing to write).
MAY_RETURN = {"count", "increment(0)"}


def _wrong_outcomes(counter: BoundedCounter, *, never_sent: bool) -> dict[str, str]:
    """Each call whose outcome is not what docs/using.md promises. ``never_sent``: no
    connection can be made, so no increment may even be in doubt."""
    wrong = {}
    for what, call, kinds in CALLS:
        allowed = (IncrementNotRecorded,) if never_sent and kinds == INCREMENT_ERRORS else kinds
        got = _outcome(call, counter)
        if got not in _expected(allowed) and not (what in MAY_RETURN and got == "returned"):
            wrong[what] = got
    return wrong


@pytest.mark.needs_processes
def test_a_new_counter_maps_a_refusing_datastore_to_our_errors(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens at the Datastore host. The issue's case: the stored bounds are
    read first, and that read failed outside the error mapping (3 of 3 raw)."""
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    broken = BoundedCounter("refused-new", maximum=100, **UNREACHABLE)
    assert _wrong_outcomes(broken, never_sent=True) == {}


def test_a_laid_out_counter_maps_a_refusing_datastore_to_our_errors(
    sharded_counter_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    relay: ReplyHoldingRelay,
) -> None:
    """Laid out and written through a relay, which is then cut (connections break, new
    ones are refused): the failure meets the increment's own shard write. gRPC
    cannot tell a connection that broke before the request from one that broke
    during it, so an increment may say "maybe" here; the total shows none landed."""
    emulator_host = sharded_counter_env["DATASTORE_EMULATOR_HOST"]
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    probe_through_relay()
    BoundedCounter("refused-known", maximum=100, **PATIENT).increment(7)
    # The same backend: this process knows the counter is laid out.
    counter = BoundedCounter("refused-known", maximum=100, **UNREACHABLE)
    relay.cut()
    try:
        wrong = _wrong_outcomes(counter, never_sent=False)
    finally:
        relay.restore()
    assert wrong == {}
    # Read straight from the emulator: nothing sent after the cut reached it.
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", emulator_host)
    assert BoundedCounter("refused-known", maximum=100).get_count(nocache=True) == 7


def test_every_method_maps_a_stalled_datastore_to_our_errors(
    sharded_counter_env: dict[str, str],
    sharded_counter_backends: Any,
    sharded_counter_engine: str,
) -> None:
    """The emulator's JVM SIGSTOPped: every call times out, and a commit sent may land
    once it runs again. Then the total is within what the callers were told."""
    # Laid out, connected and probed before the fault, on the backend ``counter`` shares.
    BoundedCounter("stalled-known", maximum=100, **PATIENT).increment(5)
    counter = BoundedCounter("stalled-known", maximum=100, **UNREACHABLE)
    fresh = BoundedCounter("stalled-new", maximum=100, **UNREACHABLE)
    emulator = sharded_counter_backends.emulator(sharded_counter_engine)
    emulator.pause()
    try:
        wrong = _wrong_outcomes(counter, never_sent=False)
        # Its stored bounds never read: the first call must read them (the case).
        fresh_increment = _outcome(lambda c: c.increment(1), fresh)
    finally:
        emulator.resume()
    assert wrong == {}
    assert fresh_increment == "IncrementNotRecorded"  # no commit of it was ever sent
    # Sent increments of +1, -1 and +1 (keyed) and two sets to 2 may have landed.
    assert 0 <= counter.get_count(nocache=True) <= 100
    assert BoundedCounter("stalled-new", maximum=100).get_count(nocache=True) == 0

"""What the fault tests share: the ledger of what callers were told, writer threads,
and a TCP relay that holds back an emulator's replies.

The ledger is the truth the totals are checked against: an increment whose
``increment()`` returned is acknowledged and must be counted once; one that
raised ``IncrementNotRecorded`` must not be counted; one that raised
``IncrementOutcomeUnknown`` may be counted once or not at all.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from sharded_counter import Counter, IncrementNotRecorded, IncrementOutcomeUnknown


def report(test: str, **numbers: Any) -> None:
    """One line of measurements per test, for the run's report (visible with ``-s``)."""
    shown = " ".join(
        f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in numbers.items()
    )
    print(f"\n[faults] {test}: {shown}")


# -- the ledger ---------------------------------------------------------------------


class Ledger:
    """What callers were told, and when: the truth the totals are checked against."""

    def __init__(self, *, unknown_allowed: bool = False) -> None:
        self._lock = threading.Lock()
        self.acknowledged = 0  # sum of deltas whose increment() returned
        self.acked_calls = 0
        self.refused = 0  # sum of deltas refused with IncrementNotRecorded
        self.refused_calls = 0
        # IncrementNotRecorded.delta beyond the caller's own delta: stash taken from
        # others (already acknowledged to them), handed to the refused caller: lost
        # unless that caller resubmits it, which these writers do not.
        self.refused_stash = 0
        self.events: list[tuple[float, float, int]] = []  # acknowledged (start, end, delta)
        self.latencies: list[tuple[float, float]] = []  # (start, seconds) of every call
        self.errors: list[BaseException] = []
        self.refusal_causes: dict[str, int] = {}  # why memcache could not hold a delta
        # IncrementOutcomeUnknown: maybe counted. Only tests that expect it (memcache
        # unable to keep unsure writes) allow it; elsewhere it is an error.
        self.unknown_allowed = unknown_allowed
        self.unknown = 0
        self.unknown_calls = 0

    def increment(self, counter: Counter, delta: int, **options: Any) -> bool:
        """Call ``counter.increment(delta, **options)`` and book the outcome; True if
        acknowledged."""
        start = time.monotonic()
        try:
            counter.increment(delta, **options)
        except IncrementNotRecorded as exc:
            end = time.monotonic()
            with self._lock:
                self.refused += delta
                self.refused_calls += 1
                self.refused_stash += exc.delta - delta
                root = exc.__context__.__cause__ if exc.__context__ is not None else None
                cause = f"{type(root).__name__}: {exc.__context__ or exc}"[:80]
                self.refusal_causes[cause] = self.refusal_causes.get(cause, 0) + 1
                self.latencies.append((start, end - start))
            return False
        except IncrementOutcomeUnknown as exc:
            end = time.monotonic()
            with self._lock:
                self.unknown += exc.delta
                self.unknown_calls += 1
                self.latencies.append((start, end - start))
            if not self.unknown_allowed:
                with self._lock:
                    self.errors.append(exc)
                raise
            return False
        except Exception as exc:  # any other error is a failure of the test
            with self._lock:
                self.errors.append(exc)
            raise
        end = time.monotonic()
        with self._lock:
            self.acknowledged += delta
            self.acked_calls += 1
            self.events.append((start, end, delta))
            self.latencies.append((start, end - start))
        return True

    def add_events(self, events: Sequence[tuple[float, float, int]]) -> None:
        """Book increments acknowledged in another process (same monotonic clock)."""
        with self._lock:
            for start, end, delta in events:
                self.acknowledged += delta
                self.acked_calls += 1
                self.events.append((start, end, delta))

    def max_latency(self, since: float = 0.0, until: float = float("inf")) -> float:
        return max((s for t, s in self.latencies if since <= t <= until), default=0.0)


def writer_threads(
    count: int,
    body: Callable[[int, threading.Event], None],
    stop: threading.Event,
) -> list[threading.Thread]:
    """Start ``count`` threads running ``body(index, stop)``; errors land in the ledger."""
    threads = [
        threading.Thread(target=swallow, args=(body, i, stop), name=f"writer-{i}", daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads


def swallow(body: Callable[[int, threading.Event], None], i: int, stop: threading.Event) -> None:
    # The ledger already holds the exception; re-raising here would only print it again.
    with contextlib.suppress(Exception):
        body(i, stop)


def join_all(threads: Sequence[threading.Thread], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads still running after {timeout}s: {stuck}"


@contextlib.contextmanager
def writers_running(
    count: int, body: Callable[[int, threading.Event], None]
) -> Iterator[threading.Event]:
    """Writers for the ``with`` block; stopped and joined however the block ends.

    A writer left running would keep hammering the backends through later tests.
    """
    stop = threading.Event()
    threads = writer_threads(count, body, stop)
    try:
        yield stop
    finally:
        stop.set()
        join_all(threads)


def increment_loop(
    ledger: Ledger,
    counter_of: Callable[[int, int], Counter],
    delta_of: Callable[[int, int], int],
    *,
    limit: int = 100_000,
    pause: float = 0.0,
) -> Callable[[int, threading.Event], None]:
    """A writer body: increment until told to stop (bounded by ``limit`` calls)."""

    def body(i: int, stop: threading.Event) -> None:
        k = 0
        while not stop.is_set() and k < limit:
            ledger.increment(counter_of(i, k), delta_of(i, k))
            k += 1
            if pause:
                time.sleep(pause)

    return body


def merged_stats(*counters: Counter) -> dict[str, int]:
    total: dict[str, int] = {}
    for counter in {id(c): c for c in counters}.values():
        for key, value in counter.stats.snapshot().items():
            total[key] = total.get(key, 0) + value
    return total


def probe_through_relay() -> None:
    """Make this process's write-mode probe of the engine through the relay (its three
    commits, remembered per process and host) with the default time limits.

    A test's counter with short limits (``rpc_timeout=0.5``) then makes a plain
    first write. Left to that counter, the probe's commits, the first through a new
    relay on a loaded machine, can take longer than the limit: that first write then
    ends unsure or stashed before the fault the test is about, and the test fails
    for its setup (seen in CI).
    """
    Counter("relay-probe", shards=1).increment(1)


class ReplyHoldingRelay:
    """A TCP relay to the emulator that can hold back the emulator's replies.

    It stands for a network that delivers a request and loses its answer, which no
    emulator does on its own: requests always pass straight through, so a commit
    held this way is really applied by the real emulator; only its reply is late.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.hold = threading.Event()
        self._stop = threading.Event()
        self._cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            if self._cut.is_set():
                time.sleep(0.01)
                continue
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            for src, dst, holdable in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, holdable), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, holdable: bool) -> None:
        pending = bytearray()  # held bytes are delayed, never dropped: HTTP/2 stays intact
        with contextlib.suppress(OSError, ValueError):
            while not self._stop.is_set():
                ready, _, _ = select.select([src], [], [], 0.01)
                if ready:
                    data = src.recv(65536)
                    if not data:
                        break
                    pending += data
                if pending and not (holdable and self.hold.is_set()):
                    dst.sendall(pending)
                    pending.clear()

    def cut(self) -> None:
        """Take the server off the network: every connection through the relay breaks,
        and new ones are refused (nothing listens), as when the server goes down.
        Requests already relayed are left to finish at the server."""
        self._cut.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets = []

    def restore(self) -> None:
        """Listen again on the same port, relaying to the same server."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.05)
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()


_Connectable = TypeVar("_Connectable")


def connected(thing: _Connectable) -> _Connectable:
    """Connect a counter (or buffer) now, with the environment as it is at this moment.

    Counters connect on their first call, reading the environment then
    (process.py). A test that points one at a dead address for a moment
    (``monkeypatch.context()`` around ``DATASTORE_EMULATOR_HOST``) has it connect
    while that address is set, as making it used to.
    """
    thing._here.get()  # type: ignore[attr-defined]
    return thing

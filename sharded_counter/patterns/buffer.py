"""CounterBuffer: add up increments in the process, write each counter once per interval.

A hot counter bumped thousands of times a second needs one Datastore write
per interval, not one per bump. Each counter's first increment schedules its
flush ``interval`` seconds later, plus up to ``jitter`` (so many processes
started together don't all flush at once). A flush that fails is tried again
``backoff`` seconds later. After ``max_attempts`` failed flushes the amount
goes through ``Counter.increment``, which stashes it in ``delayed_incr`` when
the write still fails. If even that fails (memcache down too) the amount stays
pending and is tried again: nothing is dropped while the process lives.

Each flush takes the pending amount as a *batch* named by an idempotency key of
its own (store/keyed.py), and a failed batch is retried with the same key. So
a flush whose outcome was unknown (its reply lost, memcache down too) is
retried without any risk of counting it twice. Only a batch that certainly
never landed falls back to an unkeyed ``Counter.increment`` (and its stash).
An increment given its own ``idempotency_key`` is not buffered: it is written
at once, since a redelivery must find its key in Datastore, not in one
process's memory.

One background thread does the flushing. It stops after ``timeout`` seconds
with nothing to do and starts again with the next increment. Everything still
pending is flushed at interpreter exit. A forked child starts with an empty
buffer, because what the parent had pending is the parent's to write.
"""

from __future__ import annotations

import atexit
import collections
import heapq
import logging
import random
import threading
import time
import weakref
import zlib
from typing import Any

from ..core.validation import (
    INT64_MAX,
    INT64_MIN,
    check_delta,
    check_int,
    check_name,
    check_seconds,
)
from ..counter import Counter, class_options
from ..errors import IncrementNotRecorded, IncrementOutcomeUnknown
from ..process import forget_at_fork
from ..settings import resolve
from .batches import Batch, write_batch

log = logging.getLogger("sharded_counter")

_QUEUE_LIMIT = 10_000  # async increments waiting before the caller folds them in itself
_STRIPES = 64  # locks that serialise a counter's flush with reads through the buffer

_live_buffers: weakref.WeakSet[CounterBuffer] = weakref.WeakSet()


class CounterBuffer:
    """Buffered increments for counters of ``counter_class`` (made with ``counter_options``).

    Somewhat over 250 lines, on purpose: the pending table, the flush schedule,
    the async queue and the flusher thread share one lock and one condition,
    and each method keeps them consistent with the others under it. Split
    apart, every piece would take that lock from outside. What a flush writes
    is in patterns/batches.py.
    """

    def __init__(
        self,
        counter_class: type[Counter] = Counter,
        *,
        interval: float = 5.0,
        jitter: float = 0.0,
        backoff: float = 1.0,
        max_attempts: int = 3,
        timeout: float = 10.0,
        max_keys: int = 10_000,
        **counter_options: Any,
    ) -> None:
        interval = check_seconds(interval, "interval")
        backoff = check_seconds(backoff, "backoff")
        timeout = check_seconds(timeout, "timeout")
        jitter = check_seconds(jitter, "jitter", zero_ok=True)
        max_attempts = check_int(max_attempts, "max_attempts", 1, 1_000)
        max_keys = check_int(max_keys, "max_keys", 1, 10_000_000)
        if not (isinstance(counter_class, type) and issubclass(counter_class, Counter)):
            raise TypeError("counter_class must be Counter or a subclass of it")
        # Bad options fail now, not at the first flush; clients passed in are not options.
        options = {k: v for k, v in counter_options.items() if not k.endswith("_client")}
        resolve(options, class_options(counter_class))
        self.counter_class = counter_class
        self.counter_options = counter_options
        self.interval, self.jitter, self.backoff = float(interval), float(jitter), float(backoff)
        self.max_attempts, self.timeout, self.max_keys = max_attempts, float(timeout), max_keys
        self._reset()
        _live_buffers.add(self)
        _register_exit_flush()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: dict[str, int] = {}
        self._schedule: list[tuple[float, str]] = []  # (due, name) heap; stale entries skipped
        self._due: dict[str, float] = {}
        self._failed: dict[str, Batch] = {}  # batches whose flush failed, to retry as they are
        self._in_flight: dict[str, int] = {}  # taken by a flush whose write has not finished
        self._queue: collections.deque[tuple[str, int]] = collections.deque()
        self._checked_names: set[str] = set()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._thread: threading.Thread | None = None
        self._last_activity = time.monotonic()

    # -- adding ---------------------------------------------------------------

    def increment(self, name: str, n: int = 1, *, idempotency_key: str | None = None) -> None:
        """Add ``n`` to ``name``'s pending amount; it is written at the next flush.

        With ``idempotency_key`` it is not buffered but written now, through
        ``Counter.increment`` with that key (and its errors).
        """
        if idempotency_key is not None:
            check_name(name)
            self.counter_class(name, **self.counter_options).increment(
                n, idempotency_key=idempotency_key
            )
            return
        if type(n) is not int or not INT64_MIN <= n <= INT64_MAX:
            check_delta(n)  # raises the right error; bool lands here too
        with self._lock:
            if name in self._pending:
                self._pending[name] += n
                return
            self._add_new(check_name(name), n)

    def async_increment(self, name: str, n: int = 1) -> None:
        """Like ``increment`` but takes no lock: the flusher thread picks it up.

        The arguments are checked here, so a bad call still raises in the caller.
        """
        if type(n) is not int or not INT64_MIN <= n <= INT64_MAX:
            check_delta(n)
        if name not in self._checked_names:
            self._remember_name(check_name(name))
        self._queue.append((name, n))
        if self._thread is None or len(self._queue) >= _QUEUE_LIMIT:
            # Start the flusher, or fold the queue in here so it cannot grow without end.
            with self._lock:
                self._drain_queue()
                self._ensure_thread()

    def _remember_name(self, name: str) -> None:
        # Checking a name costs an encode; the hot path checks each one once.
        if len(self._checked_names) > 2 * self.max_keys:
            self._checked_names.clear()
        self._checked_names.add(name)

    def _add_new(self, name: str, n: int) -> None:
        """First increment of ``name`` since its last flush (lock held)."""
        self._pending[name] = n
        if name not in self._due:
            self._schedule_flush(
                name, time.monotonic() + self.interval + random.random() * self.jitter
            )
        if len(self._pending) > self.max_keys:
            # Bounded memory: write everything now rather than grow without end.
            now = time.monotonic()
            for key in self._pending:
                self._schedule_flush(key, now)
        self._ensure_thread()

    def _schedule_flush(self, name: str, due: float) -> None:
        if self._due.get(name, float("inf")) <= due:
            return
        self._due[name] = due
        heapq.heappush(self._schedule, (due, name))
        self._wake.notify()

    def _drain_queue(self) -> None:
        """Move async increments into the pending table (lock held)."""
        queue = self._queue
        while queue:
            name, n = queue.popleft()
            if name in self._pending:
                self._pending[name] += n
            else:
                try:
                    self._add_new(check_name(name), n)
                except (TypeError, ValueError) as exc:
                    log.error("dropped async increment of %r: %s", name, exc)

    # -- reading --------------------------------------------------------------

    def pending(self, name: str) -> int:
        """What ``name`` has waiting to be written, or being written now (0 when nothing)."""
        with self._lock:
            self._drain_queue()
            failed = self._failed.get(name)
            return (
                self._pending.get(name, 0)
                + self._in_flight.get(name, 0)
                + (failed.amount if failed is not None else 0)
            )

    def count(self, name: str, *, nocache: bool = False) -> int:
        """The counter's total including what is still pending here.

        Taken under the counter's flush lock, so an amount being written is
        counted once: either still pending or already in the total.
        """
        with self._stripe(name):
            total = self.counter_class(name, **self.counter_options).get_count(nocache=nocache)
            return total + self.pending(name)

    # -- flushing ---------------------------------------------------------------

    def flush(self, name: str | None = None) -> None:
        """Write ``name``'s pending amount (or every counter's) now, in this thread.

        An amount whose write fails goes back into the buffer and the first
        error is raised after the others were tried.
        """
        with self._lock:
            self._drain_queue()
            names = list({**self._failed, **self._pending}) if name is None else [name]
        first_error: BaseException | None = None
        for key in names:
            try:
                self._flush_one(key, final=True)
            except Exception as exc:  # each counter gets its chance; report the first
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def _flush_one(self, name: str, *, final: bool) -> None:
        with self._stripe(name):
            with self._lock:
                self._due.pop(name, None)
                batch = self._failed.pop(name, None)
                retrying = batch is not None
                if batch is None:
                    amount = self._pending.pop(name, 0)
                    if amount == 0:
                        return
                    batch = Batch(amount)
                self._in_flight[name] = batch.amount
            batch.attempts += 1
            counter = self.counter_class(name, **self.counter_options)
            try:
                write_batch(counter, batch, last_try=final or batch.attempts >= self.max_attempts)
            except IncrementOutcomeUnknown as exc:
                if not batch.lost:
                    # Its key decides: a retry with it writes nothing if this landed.
                    batch.doubtful = True
                    self._requeue(name, batch, exc)
                raise
            except Exception as exc:
                self._requeue(name, batch, exc)
                raise
            finally:
                with self._lock:
                    self._in_flight.pop(name, None)
            if retrying:
                with self._lock:
                    if name in self._pending:
                        # Added while a failed batch waited its turn: its flush is due.
                        self._schedule_flush(name, time.monotonic())

    def _requeue(self, name: str, batch: Batch, exc: BaseException) -> None:
        with self._lock:
            self._in_flight.pop(name, None)
            self._failed[name] = batch
            self._schedule_flush(name, time.monotonic() + self.backoff)
            self._ensure_thread()
        failed = isinstance(exc, (IncrementNotRecorded, IncrementOutcomeUnknown))
        log.log(
            logging.ERROR if failed else logging.WARNING,
            "flush of %r (%d%s) failed, attempt %d: %s",
            name,
            batch.amount,
            ", outcome unknown: retried with its key" if batch.doubtful else "",
            batch.attempts,
            exc,
        )

    def _stripe(self, name: str) -> threading.Lock:
        return self._stripes[zlib.crc32(name.encode("utf-8", "surrogatepass")) % _STRIPES]

    # -- the flusher thread -------------------------------------------------------

    def _ensure_thread(self) -> None:
        """Start the flusher if it is not running (lock held)."""
        if self._thread is None or not self._thread.is_alive():
            self._last_activity = time.monotonic()
            self._thread = threading.Thread(
                target=self._run, name="sharded-counter-buffer", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                due_names = self._wait_for_work()
                if due_names is None:
                    self._thread = None  # idle past the timeout: the next increment restarts us
                    return
            for name in due_names:
                try:
                    self._flush_one(name, final=False)
                except Exception:  # already requeued and logged
                    continue

    def _wait_for_work(self) -> list[str] | None:
        """Names due now, waiting as needed; None when idle past the timeout (lock held)."""
        while True:
            self._drain_queue()
            now = time.monotonic()
            schedule = self._schedule
            while schedule and self._due.get(schedule[0][1]) != schedule[0][0]:
                heapq.heappop(schedule)  # superseded, or flushed on demand meanwhile
            due: list[str] = []
            while schedule and schedule[0][0] <= now:
                when, name = heapq.heappop(schedule)
                if self._due.get(name) == when:
                    due.append(name)
            if due:
                self._last_activity = now
                return due
            if not self._schedule and not self._queue:
                idle_left = self._last_activity + self.timeout - now
                if idle_left <= 0:
                    return None
                self._wake.wait(idle_left)
            else:
                self._wake.wait(max(0.0, self._schedule[0][0] - now) if self._schedule else 0.01)

    def stop(self) -> None:
        """Flush everything and let the flusher thread end."""
        self.flush()
        with self._lock:
            thread = self._thread
            self._last_activity = float("-inf")
            self._wake.notify()
        if thread is not None:
            thread.join(timeout=5)


_exit_hook_registered = False


def _register_exit_flush() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        _exit_hook_registered = True
        atexit.register(_flush_all_at_exit)


def _flush_all_at_exit() -> None:
    for buffer in list(_live_buffers):
        try:
            buffer.flush()
        except Exception as exc:
            log.error("at exit, a buffered counter could not be written: %s", exc)


@forget_at_fork
def _forget_parents_pending() -> None:
    for buffer in list(_live_buffers):
        buffer._reset()

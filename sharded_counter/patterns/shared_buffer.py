"""SharedBuffer: increments held in memcache for every process, written once per interval.

Sentry's write buffer, on this library's own protocol. ``increment(name, n)``
adds ``n`` to the counter's ``delayed_incr`` stash in memcache
(``Counter.defer``: one ``gets`` and one ``cas``, shared by the threads of a
process adding to the same counter at once, as group commit shares a write)
and, when the counter had nothing pending, lists its name for the flusher
(``cache/pending_names.py``: one ``append``). A flusher, in this process or any
other (``flusher=True``, or ``sharded-counter flush --every 5`` from cron or a
worker), takes the listed names every ``interval`` seconds and writes each
counter's pending amount with one shard write (``Counter.write_pending``),
holding a lock per counter so that one flusher at a time writes it.

The pending amount *is* the stash of ``delayed_incr``: no third mechanism. So
the stash's guarantees hold for it (docs/protocol.md): reads count pending
amounts at once; a flush takes the amount with a marker and its write carries
a token, so a flusher that dies at any point loses nothing and counts nothing
twice (its marker expires into an unsure fold part, resolved by the next
flush); two flushers racing take disjoint amounts; a ``count = v`` replaces
what is pending. What it shares with the stash too is its loss window:
memcache losing the key (a restart, a flush, eviction) before the flush
loses what it held, as Sentry's talk says of its own buffer.

``CounterBuffer`` (patterns/buffer.py) is the other way: pending amounts live
in one process, so each process writes each counter once per interval, and a
``kill -9`` loses what that process held.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
import weakref
from typing import Any, NamedTuple

from ..cache.pending_names import PendingNames
from ..core.validation import INT64_MAX, check_choice, check_delta, check_name, check_seconds
from ..counter import Counter, class_options
from ..errors import (
    CacheUnavailable,
    DatastoreUnavailable,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
)
from ..paths.backend import backend_for
from ..paths.combiner import combiner_for
from ..paths.wiring import GivenClients
from ..process import PerProcess, forget_at_fork
from ..settings import resolve
from .lock import Holder, Locked, internal_lock, who_holds_internal

log = logging.getLogger("sharded_counter")

ON_CACHE_FAILURE = ("raise", "direct")
#: Counter objects, and the times names were listed, kept per buffer; past it the
#: oldest goes (a Counter is made anew; a name is listed again at its next increment).
MAX_COUNTERS = 10_000
_MAX_BACKOFF = 60.0  # the longest wait between rounds while the backends keep failing

#: What a backend that is down or stalled raises: a round that meets one of these waits
#: longer before the next (see ``FlushBackoff``). Anything else is one counter's own
#: problem, logged with its name, and the other counters flush as usual.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    CacheUnavailable,
    DatastoreUnavailable,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
)


@dataclasses.dataclass
class FlushBackoff:
    """How long a flusher waits before its next round: ``interval`` while rounds go
    well; after ``n`` rounds in a row that met a down backend, ``interval * 2**n``
    capped at ``cap``, of which a random part (up to ``jitter``, a fraction) is left
    out, so that flushers that failed together do not all come back at once.

    A strategy object as tenacity's ``wait_*`` are, but driven by rounds: the
    flusher keeps running whatever happens, so there is no stop condition.
    """

    interval: float
    cap: float = _MAX_BACKOFF
    jitter: float = 0.5
    failures: int = 0

    def after(self, round_: FlushRound) -> float:
        """Seconds to wait after ``round_``, counting it among the failures or not."""
        self.failures = min(self.failures + 1, 32) if round_.transient else 0
        if not self.failures:
            return self.interval
        longest = max(self.interval, min(self.cap, self.interval * 2**self.failures))
        shortest = max(self.interval, longest * (1 - self.jitter))
        return random.uniform(shortest, longest)


@dataclasses.dataclass
class FlushRound:
    """What one round of a flusher came to. Built by ``SharedBuffer.flush_round``,
    which never raises: every failure is here instead."""

    written: list[str] = dataclasses.field(default_factory=list)
    #: The counters whose flush raised, with what: each stays pending in memcache.
    failed: dict[str, Exception] = dataclasses.field(default_factory=dict)
    #: Set when the list of pending counters itself could not be taken (memcache down).
    listing_error: Exception | None = None

    @property
    def transient(self) -> bool:
        """Did a backend fail in this round (so that the next one should wait longer)?
        A round that could not even take the list of counters counts as one."""
        if self.listing_error is not None:
            return True
        return any(isinstance(exc, TRANSIENT_ERRORS) for exc in self.failed.values())

    def first_error(self) -> Exception | None:
        if self.listing_error is not None:
            return self.listing_error
        return next(iter(self.failed.values()), None)

    def log(self, next_in: float | None = None) -> None:
        """Log each failure with its counter's name: a warning for a down backend, an
        error with its traceback for anything else."""
        later = "" if next_in is None else f"; next round in {next_in:.1f} s"
        if self.listing_error is not None:
            log.warning(
                "shared buffer: could not take the pending counters (%s)%s",
                self.listing_error,
                later,
            )
        for name, exc in self.failed.items():
            if isinstance(exc, TRANSIENT_ERRORS):
                log.warning("shared buffer: flush of %r failed (%s)%s", name, exc, later)
            else:
                log.error(
                    "shared buffer: flush of %r failed; its amount stays pending",
                    name,
                    exc_info=exc,
                )


class _Here(NamedTuple):
    """What a SharedBuffer works with in one process."""

    names: PendingNames
    scope: str


class SharedBuffer:
    """Increments of counters of ``counter_class`` (made with ``counter_options``) held in
    memcache until a flusher writes them, once per counter per ``interval`` seconds."""

    def __init__(
        self,
        interval: float = 5.0,
        *,
        flusher: bool = False,
        on_cache_failure: str = "raise",
        counter_class: type[Counter] = Counter,
        **counter_options: Any,
    ) -> None:
        check_seconds(interval, "interval")
        check_choice(on_cache_failure, "on_cache_failure", ON_CACHE_FAILURE)
        if not (isinstance(counter_class, type) and issubclass(counter_class, Counter)):
            raise TypeError("counter_class must be Counter or a subclass of it")
        # Bad options fail now, not at the first increment; clients are not options.
        options = {k: v for k, v in counter_options.items() if not k.endswith("_client")}
        self.settings = resolve(options, class_options(counter_class))
        self._clients = GivenClients(
            counter_options.get("datastore_client"), counter_options.get("memcache_client")
        )
        # The list of pending names, over this process's own memcache connections: made on
        # first use, and again in a forked child.
        self._here: PerProcess[_Here] = PerProcess(self._connect)
        self.interval = float(interval)
        self.on_cache_failure = on_cache_failure
        self.counter_class = counter_class
        self.counter_options = counter_options
        self._lock = threading.Lock()
        self._counters: dict[str, Counter] = {}
        self._listed_at: dict[str, float] = {}  # when this process last listed each name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _live_buffers.add(self)
        if flusher:
            self.start_flusher()

    def _connect(self) -> _Here:
        given = self._clients.here()
        backend = backend_for(self.settings, given.datastore, given.memcache)
        scope = backend.store.scope
        return _Here(backend.cache.pending_names(self.settings.key_prefix, scope), scope)

    @property
    def _scope(self) -> str:
        return self._here.get().scope

    @property
    def _names(self) -> PendingNames:
        return self._here.get().names

    # -- adding ----------------------------------------------------------------------

    def increment(self, name: str, n: int = 1) -> None:
        """Add ``n`` (any int64) to ``name``'s pending amount in memcache.

        Returns once memcache holds it: from then on reads count it, and it
        survives the death of this process. When memcache cannot take it,
        ``on_cache_failure`` decides: ``"raise"`` raises ``CacheUnavailable``
        (not counted), ``"direct"`` writes it with ``Counter.increment`` instead
        (and its errors). ``IncrementOutcomeUnknown`` means memcache may have
        kept it (its reply was lost). ``CounterOverflowError``: the pending
        amount would leave the signed 64-bit range (nothing kept; no one write
        could carry it). Bad input raises ``TypeError`` / ``ValueError`` before
        anything is written.
        """
        check_name(name)
        n = check_delta(n)
        counter = self._counter(name)

        def defer(amount: int) -> None:
            if counter.defer(amount) or self._listing_due(name):
                self._list(name)

        # Threads of this process adding to one counter share one gets + cas: with each
        # doing its own, a hot counter's stash key loses most cas races and retries.
        combiner = combiner_for("shared-buffer", self._scope, self.settings.key_prefix, name)
        try:
            combiner.run(n, defer, limit=1, max_total=INT64_MAX)
        except CacheUnavailable:
            if self.on_cache_failure == "direct":
                counter.increment(n)
                return
            raise

    def _listing_due(self, name: str) -> bool:
        # A listing may be lost (a flusher that took it died); listing again once an
        # interval has passed bounds how long a counter can wait unnoticed.
        listed = self._listed_at.get(name)
        return listed is None or time.monotonic() - listed > self.interval

    def _list(self, name: str) -> None:
        try:
            self._names.register(name)
        except CacheUnavailable as exc:
            # The amount is kept all the same; the next increment lists the name again.
            log.warning("could not list counter %r for the flusher: %s", name, exc)
            return
        with self._lock:
            self._listed_at.pop(name, None)  # re-inserted: the dict stays oldest first
            self._listed_at[name] = time.monotonic()
            _drop_oldest(self._listed_at)

    def _counter(self, name: str) -> Counter:
        counter = self._counters.get(name)
        if counter is None:
            counter = self.counter_class(name, **self.counter_options)
            with self._lock:
                self._counters[name] = counter
                _drop_oldest(self._counters)
        return counter

    # -- reading ---------------------------------------------------------------------

    def pending(self, name: str) -> int:
        """What memcache holds for ``name`` that is not in its shards yet.

        Raises ``CacheUnavailable`` when memcache does not answer (or none is
        configured): what it holds is unknown then, and 0 would be a guess.
        """
        check_name(name)
        counter = self._counter(name)
        cache = counter._backend.cache  # this process's, as the counter connects here
        if not cache.enabled:
            raise CacheUnavailable("no memcached servers are configured (set MEMCACHED_HOSTS)")
        return cache.peek_stash(counter._stash_key)

    def count(self, name: str, *, nocache: bool = False) -> int:
        """``name``'s total, pending amounts included (a plain ``Counter`` read)."""
        check_name(name)
        return self._counter(name).get_count(nocache=nocache)

    # -- flushing --------------------------------------------------------------------

    def flush(self, name: str | None = None) -> list[str]:
        """Write what is pending now: ``name``'s, or every listed counter's.

        Each counter is written by one flusher at a time (a lock per counter);
        one another flusher holds is skipped. Returns the names written. A write
        that fails leaves the amount pending (and lists the name again when a
        backend failed); the first error is raised after the others were tried.
        """
        if name is not None:
            check_name(name)
        outcome = self.flush_round(None if name is None else [name])
        error = outcome.first_error()
        if error is not None:
            raise error
        return outcome.written

    def flush_round(self, names: list[str] | None = None) -> FlushRound:
        """One flusher round over ``names`` (default: every listed counter). Never
        raises an ``Exception``: what failed, and for which counter, is in the result.

        A counter whose flush meets a down backend is listed again for the next
        round; one that fails for a reason of its own is not (its amount stays
        pending all the same, reads count it, and its next increment after an
        interval lists it again), so one bad name cannot fail every round.
        """
        outcome = FlushRound()
        if names is None:
            try:
                names = sorted(self._listed_names())
            except Exception as exc:
                outcome.listing_error = exc
                return outcome
        for each in names:
            try:
                if self._flush_one(each):
                    outcome.written.append(each)
            except Exception as exc:
                outcome.failed[each] = exc
                if isinstance(exc, TRANSIENT_ERRORS):
                    self._list_again(each)
        return outcome

    def _list_again(self, name: str) -> None:
        try:
            self._list(name)
        except Exception:  # never let a name we could not list stop the round
            log.exception("shared buffer: could not list %r again", name)

    def _listed_names(self) -> set[str]:
        return self._names.take()

    def flush_holder(self, name: str) -> Holder | None:
        """Who holds ``name``'s flush lock now (a flusher writing it), or None. Raises
        ``CacheUnavailable``."""
        check_name(name)
        return who_holds_internal(
            *self._flush_lock(name),
            memcache_client=self.counter_options.get("memcache_client"),
            settings=self.settings,
        )

    def _flush_lock(self, name: str) -> tuple[str, str, str]:
        # A lock of the library's own: no user's lock(name) can take its key.
        return ("flush", self._scope, name)

    def _flush_one(self, name: str) -> bool:
        settings = self.settings
        # The lock outlives a flush's own time limits: only a flusher that died leaves
        # it to lapse, and its fold then resolves as the stash's protocol says.
        ttl = math.ceil(settings.retry_deadline + 2 * settings.rpc_timeout + 2)
        try:
            with internal_lock(
                *self._flush_lock(name),
                ttl=ttl,
                memcache_client=self.counter_options.get("memcache_client"),
                settings=settings,
            ):
                self._counter(name).write_pending()
        except Locked:
            return False  # another flusher is writing it now
        return True

    # -- the flusher thread ----------------------------------------------------------

    def start_flusher(self) -> None:
        """Flush every listed counter every ``interval`` seconds, in a daemon thread."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="sharded-counter-shared-buffer", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        backoff = FlushBackoff(self.interval)
        delay = self.interval
        while not self._stop.wait(delay):
            try:
                outcome = self.flush_round()
            except Exception as exc:  # flush_round catches everything: a last resort
                outcome = FlushRound(listing_error=exc)
            delay = backoff.after(outcome)
            outcome.log(delay)

    @property
    def flusher_running(self) -> bool:
        """Is this buffer's flusher thread alive?"""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stop(self) -> None:
        """Stop the flusher thread (after its current round) and flush once more."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=max(30.0, 2 * self.interval))
        self.flush()


_live_buffers: weakref.WeakSet[SharedBuffer] = weakref.WeakSet()


@forget_at_fork
def _forget_parents_threads() -> None:
    # A forked child has none of its parent's threads: a lock one of them held would
    # never be released, and the flusher is the parent's (the names are listed in
    # memcache, so it flushes what children add; a child may start its own).
    for buffer in list(_live_buffers):
        buffer._lock = threading.Lock()
        buffer._stop = threading.Event()
        buffer._thread = None


def _drop_oldest(kept: dict[str, Any]) -> None:
    """Past ``MAX_COUNTERS`` entries, forget the first inserted (called under the lock)."""
    while len(kept) > MAX_COUNTERS:
        del kept[next(iter(kept))]

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

import logging
import math
import threading
import time
from typing import Any

from ..core.validation import INT64_MAX, check_delta, check_name
from ..counter import Counter, class_options
from ..errors import CacheUnavailable, DatastoreUnavailable, ShardedCounterError
from ..paths.backend import backend_for
from ..paths.combiner import combiner_for
from ..settings import resolve
from .lock import Locked, lock

log = logging.getLogger("sharded_counter")

ON_CACHE_FAILURE = ("raise", "direct")
_MAX_COUNTERS = 10_000  # Counter objects kept for increments; past it they are made anew
_MAX_BACKOFF = 60.0


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
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        if not math.isfinite(interval):
            raise ValueError(f"interval must be finite, not {interval!r}")
        if on_cache_failure not in ON_CACHE_FAILURE:
            raise ValueError(
                f"on_cache_failure must be one of {', '.join(ON_CACHE_FAILURE)}, "
                f"not {on_cache_failure!r}"
            )
        if not (isinstance(counter_class, type) and issubclass(counter_class, Counter)):
            raise TypeError("counter_class must be Counter or a subclass of it")
        # Bad options fail now, not at the first increment; clients are not options.
        options = {k: v for k, v in counter_options.items() if not k.endswith("_client")}
        self.settings = resolve(options, class_options(counter_class))
        backend = backend_for(
            self.settings,
            counter_options.get("datastore_client"),
            counter_options.get("memcache_client"),
        )
        self._cache = backend.cache
        self._names = backend.cache.pending_names(self.settings.key_prefix, backend.store.scope)
        self._scope = backend.store.scope
        self.interval = float(interval)
        self.on_cache_failure = on_cache_failure
        self.counter_class = counter_class
        self.counter_options = counter_options
        self._lock = threading.Lock()
        self._counters: dict[str, Counter] = {}
        self._listed_at: dict[str, float] = {}  # when this process last listed each name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if flusher:
            self.start_flusher()

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
            if len(self._listed_at) > _MAX_COUNTERS:
                self._listed_at.clear()
            self._listed_at[name] = time.monotonic()

    def _counter(self, name: str) -> Counter:
        counter = self._counters.get(name)
        if counter is None:
            counter = self.counter_class(name, **self.counter_options)
            with self._lock:
                if len(self._counters) > _MAX_COUNTERS:
                    self._counters.clear()
                self._counters[name] = counter
        return counter

    # -- reading ---------------------------------------------------------------------

    def pending(self, name: str) -> int:
        """What memcache holds for ``name`` that is not in its shards yet.

        Raises ``CacheUnavailable`` when memcache does not answer (or none is
        configured): what it holds is unknown then, and 0 would be a guess.
        """
        check_name(name)
        counter = self._counter(name)
        if not self._cache.enabled:
            raise CacheUnavailable("no memcached servers are configured (set MEMCACHED_HOSTS)")
        return self._cache.peek_stash(counter._stash_key)

    def count(self, name: str, *, nocache: bool = False) -> int:
        """``name``'s total, pending amounts included (a plain ``Counter`` read)."""
        check_name(name)
        return self._counter(name).get_count(nocache=nocache)

    # -- flushing --------------------------------------------------------------------

    def flush(self, name: str | None = None) -> list[str]:
        """Write what is pending now: ``name``'s, or every listed counter's.

        Each counter is written by one flusher at a time (a lock per counter);
        one another flusher holds is skipped. Returns the names written. A write
        that fails leaves the amount pending and lists the name again; the first
        error is raised after the others were tried.
        """
        if name is not None:
            check_name(name)
            names = {name}
        else:
            names = self._listed_names()
        written: list[str] = []
        first_error: BaseException | None = None
        for each in sorted(names):
            try:
                if self._flush_one(each):
                    written.append(each)
            except Exception as exc:
                first_error = first_error or exc
                self._list(each)  # it stays pending: try it next round
        if first_error is not None:
            raise first_error
        return written

    def _listed_names(self) -> set[str]:
        return self._names.take()

    def _flush_one(self, name: str) -> bool:
        settings = self.settings
        # The lock outlives a flush's own time limits: only a flusher that died leaves
        # it to lapse, and its fold then resolves as the stash's protocol says.
        ttl = math.ceil(settings.retry_deadline + 2 * settings.rpc_timeout + 2)
        try:
            with lock(
                f"flush:{self._scope}:{name}",
                ttl=ttl,
                memcache_client=self.counter_options.get("memcache_client"),
                memcached_hosts=settings.memcached_hosts,
                key_prefix=settings.key_prefix,
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
        failures = 0
        while not self._stop.wait(min(self.interval * 2**failures, _MAX_BACKOFF)):
            try:
                self.flush()
            except (ShardedCounterError, DatastoreUnavailable) as exc:
                failures = min(failures + 1, 10)
                log.warning(
                    "shared buffer flush failed (%s); next try in %.1f s",
                    exc,
                    min(self.interval * 2**failures, _MAX_BACKOFF),
                )
            else:
                failures = 0

    def stop(self) -> None:
        """Stop the flusher thread (after its current round) and flush once more."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=max(30.0, 2 * self.interval))
        self.flush()

"""What the simulated processes share: the two models, the clock, and the faults.

A ``World`` holds one ``DatastoreModel`` and one ``MemcacheModel``, and answers
the effects of every task (``scheduler.py``) after a latency drawn from the
seed. Each logical process (``SimProcess``) has what a real process has of
its own: its cache tier (sightings, backlog), its shard picker, its token
slot, its counter paths. Only the ``ShardStore`` is shared: it holds no state.

Faults are drawn from the seed too (``Faults``) and injected where the real
thing fails:

* Datastore: an outage (refused: never sent), a lost reply (the commit
  applied, the caller hears ``DeadlineExceeded``), a late commit (the caller
  hears a broken connection at once; the commit applies later, before its
  deadline);
* memcache: calls refused (never sent), replies lost (a write applied, the
  caller hears a timeout), a key evicted, ``flush_all``, a restart (down a
  while, then empty);
* a process killed mid-step, and started again with nothing of its own.

Memcache calls go through the real ``GuardedClient`` (cache/guarded.py), so the
errors the steps see are the ones the tier makes of socket failures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable
from typing import Any

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import datastore

from ...cache.tier import CacheTier
from ...core.effects import Memcache, Rpc
from ...core.keys import cache_keys
from ...memory.cache import MemcacheModel
from ...memory.datastore import Blocked, DatastoreModel, google_error
from ...paths.backend import Backend, note_transforms
from ...paths.combiner import WriteCombiner
from ...paths.context import CounterContext
from ...paths.picker import ShardPicker
from ...paths.stats import WriteStats
from ...paths.wiring import CounterPaths
from ...settings import Settings
from ...store import entities
from ...store.rpc import refine_error
from ...store.shards import ShardStore
from .clock import VirtualClock
from .scheduler import PARKED, Scheduler, Task

COUNTER = "simulated"

_store: ShardStore | None = None


def shared_store(rpc_timeout: float) -> ShardStore:
    """One ``ShardStore`` for every history of this Python process: making its client
    costs a quarter of a second, and it holds nothing a history changes."""
    global _store
    if _store is None:
        client = datastore.Client(project="sim", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        _store = ShardStore(client, rpc_timeout=rpc_timeout)
    return _store


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The shape of one history."""

    engine: str = "firestore"
    processes: int = 4
    threads: int = 2  # per process: they share its picker, token slot and cache tier
    operations: int = 200
    faults: int = 6
    shards: int = 0  # 0: drawn from the seed, 1 to 3 (fewer shards, more writes to each)
    max_shards: int = 6
    rpc_timeout: float = 5.0
    retry_deadline: float = 10.0
    # For shrinking (shrink.py). No operation starts after the ``stop_after``-th: the
    # history up to there is as it was. The faults numbered in ``skip_faults`` are
    # drawn, not injected: the others are as they were (kind, parameters, the
    # operation they come at), and what follows the first skipped one may differ.
    # The operations numbered (from 1) in ``skip_operations`` are drawn, not run.
    # As the Firestore emulator was measured to behave (docs/protocol.md, section 6):
    # a commit waiting on a lock when its caller's deadline passes stays queued, and
    # applies once the lock is free (a transaction's, only until ``lock_timeout``).
    # Off by default: the protocol does not survive it yet (a known double count).
    queue_past_deadline: bool = False
    stop_after: int | None = None
    skip_faults: frozenset[int] = frozenset()
    skip_operations: frozenset[int] = frozenset()


@dataclasses.dataclass
class Window:
    """A fault that lasts: from ``start`` for ``seconds`` (virtual time)."""

    kind: str
    start: float
    seconds: float


class Faults:
    """The faults of one history, and the odds of each call meeting one."""

    def __init__(self, draws: random.Random) -> None:
        self.draws = draws
        self.windows: list[Window] = []
        self._over = 0.0  # when the last window closes
        self.lost_commits = 0  # the next commits applied, their replies lost
        self.late_commits = 0  # the next commits applied after their callers gave up
        self.injected: list[str] = []

    def open(self, kind: str, start: float, seconds: float) -> None:
        """A fault of ``kind`` from ``start`` (virtual time) for ``seconds``."""
        self.windows.append(Window(kind, start, seconds))
        self._over = max(self._over, start + seconds)

    def active(self, kind: str, now: float) -> bool:
        if now >= self._over:
            return False  # most calls: asked twice for each memcache call
        return any(w.kind == kind and w.start <= now < w.start + w.seconds for w in self.windows)

    def off(self) -> None:
        self.windows = []
        self._over = 0.0
        self.lost_commits = self.late_commits = 0


class FaultyCache:
    """The memcache model as a socket client would meet it: ``GuardedClient`` calls this,
    and the world's faults decide whether the call is refused, or lost after it applied."""

    def __init__(self, world: World) -> None:
        self._world = world

    def __getattr__(self, method: str) -> Callable[..., Any]:
        world = self._world
        target = getattr(world.memcache, method)

        def call(*args: Any, **kwargs: Any) -> Any:
            now = world.clock.now
            faults = world.faults
            if faults.active("cache_down", now):
                world.cache_failed()
                raise ConnectionRefusedError("[Errno 111] Connection refused")
            if faults.active("cache_flaky", now) and world.draws.random() < 0.3:
                world.cache_failed()
                if world.draws.random() < 0.5:
                    raise ConnectionRefusedError("[Errno 111] Connection refused")
                target(*args, **kwargs)
                raise TimeoutError("timed out")  # sent, and maybe applied: reply lost
            return target(*args, **kwargs)

        setattr(self, method, call)  # made once a method: __getattr__ is not asked again
        return call


class SimProcess:
    """One logical process: its own cache tier, picker and token slot, as after a start."""

    def __init__(self, world: World, pid: int, incarnation: int) -> None:
        self.pid = pid
        self.incarnation = incarnation
        self.slot = f"{world.draws.getrandbits(32):08x}"
        self.tier = CacheTier(FaultyCache(world), ttl=3600)
        backend = Backend(world.store, self.tier, world.write_mode)
        record_key, stash_key = cache_keys(world.settings.key_prefix, world.store.scope, COUNTER)
        ctx = CounterContext(
            name=COUNTER,
            settings=world.settings,
            backend=backend,
            record_key=record_key,
            stash_key=stash_key,
            picker=ShardPicker(),
            combiner=WriteCombiner(),
            stats=WriteStats(),
        )
        self.paths = CounterPaths.on(ctx)
        self.tasks: list[Task] = []  # its threads


class World:
    """The models, the clock, the faults and the processes of one history."""

    def __init__(self, knobs: Knobs, clock: VirtualClock, draws: random.Random) -> None:
        self.knobs = knobs
        self.clock = clock
        self.draws = draws
        self.settings = Settings(
            shards=knobs.shards or draws.randint(1, 3),
            max_shards=knobs.max_shards,
            rpc_timeout=knobs.rpc_timeout,
            retry_deadline=knobs.retry_deadline,
            project="sim",
            write_mode="transform" if knobs.engine == "firestore" else "transaction",
        )
        self.write_mode = self.settings.write_mode
        self.store = shared_store(knobs.rpc_timeout)
        # What a probe would find (paths/backend.py), noted so that none is sent: the
        # blocking probe would leave the simulation for the network.
        note_transforms(self.store, knobs.engine == "firestore")
        self.datastore = DatastoreModel(knobs.engine)
        self.memcache = MemcacheModel(clock.monotonic)
        self.faults = Faults(draws)
        self.scheduler = Scheduler(self)
        # transaction -> the calls parked on its locks (with the event that parked each)
        self._waiting: dict[bytes, list[tuple[Task, Callable[[], Any], int]]] = {}
        self._orphans: dict[bytes, list[Callable[[], None]]] = {}  # queued past deadline
        self.datastore.on_end.append(self._wake_waiters)
        self.checks: list[Callable[[], None]] = []  # run after every event
        self.current: SimProcess | None = None  # whose event is running
        self.cache_failures: dict[int, int] = {}  # by process: cache calls that failed

    # -- what the scheduler asks of the world --------------------------------------------------

    def enter(self, process: SimProcess | None) -> None:
        """Make ``process`` this Python process's self: its token slot."""
        self.current = process
        if process is not None:
            entities.process_slot = process.slot

    def cache_failed(self) -> None:
        """A cache call of the process running now failed (reads may then miss the stash)."""
        if self.current is not None:
            key = self.current.incarnation
            self.cache_failures[key] = self.cache_failures.get(key, 0) + 1

    def after_event(self) -> None:
        for check in self.checks:
            check()

    def call(self, scheduler: Scheduler, task: Task, effect: Memcache | Rpc) -> None:
        """Answer ``effect`` for ``task`` after a latency drawn from the seed."""
        now = self.clock.now
        if isinstance(effect, Memcache):
            tier = task.owner.tier
            scheduler.at(
                now + self.draws.uniform(0.0001, 0.001), task, lambda: tier.perform(effect)
            )
            return
        sent = now
        latency = self.draws.uniform(0.002, 0.03)

        def action() -> Any:
            return self._rpc(scheduler, task, effect, sent, action)

        action.queued = False  # type: ignore[attr-defined]  # set when a lock held it

        scheduler.at(now + latency, task, action)

    def _rpc(
        self, scheduler: Scheduler, task: Task, effect: Rpc, sent: float, action: Callable[[], Any]
    ) -> Any:
        now = self.clock.now
        faults = self.faults
        deadline = sent + self.knobs.rpc_timeout
        commit = effect.method == "commit"
        if now >= deadline and self.knobs.queue_past_deadline and getattr(action, "queued", False):
            if commit:
                self._queued(effect.request)  # the server still holds it, outage or not
            raise google_error(gexc.DeadlineExceeded, "Deadline Exceeded")
        if faults.active("datastore_down", now):
            raise google_error(gexc.ServiceUnavailable, "failed to connect to all addresses")
        if now >= deadline:
            raise google_error(gexc.DeadlineExceeded, "Deadline Exceeded")
        if commit and faults.late_commits:
            faults.late_commits -= 1
            self._late(scheduler, effect, deadline)
            raise google_error(gexc.ServiceUnavailable, "Connection reset by peer")
        try:
            answer = self.datastore.call(effect.method, effect.request, now)
        except Blocked as blocked:
            # Asked again when the holder ends, or when this call's waits run out.
            action.queued = True  # type: ignore[attr-defined]
            wait_until = min(deadline, now + self.datastore.lock_timeout)
            scheduler.at(max(wait_until, now + 1e-6), task, action)
            self._waiting.setdefault(blocked.holder, []).append((task, action, task.wake))
            return PARKED
        except gexc.GoogleAPICallError as exc:
            raise refine_error(exc) from None
        if commit and faults.lost_commits:
            faults.lost_commits -= 1
            raise google_error(gexc.DeadlineExceeded, "Deadline Exceeded")
        return answer

    def _queued(self, request: Any) -> None:
        """A commit whose caller gave up while it waited on a lock: tried again each time
        the lock it waits on is freed, until it applies or the engine refuses it (a
        transaction's wait ends at ``lock_timeout``)."""

        def apply() -> None:
            try:
                self.datastore.call("commit", request, self.clock.now)
            except Blocked as blocked:
                self._orphans.setdefault(blocked.holder, []).append(apply)
            except gexc.GoogleAPICallError:
                pass  # refused: it never lands

        apply()

    def _late(self, scheduler: Scheduler, effect: Rpc, deadline: float) -> None:
        """Apply the commit ``effect`` later, before ``deadline``, whoever waits for it."""

        def apply() -> None:
            # Refused, or it would wait: then it never lands.
            with contextlib.suppress(Blocked, gexc.GoogleAPICallError):
                self.datastore.call("commit", effect.request, self.clock.now)

        scheduler.later(self.draws.uniform(self.clock.now, deadline), apply)

    def _wake_waiters(self, txn: bytes) -> None:
        for apply in self._orphans.pop(txn, []):
            self.scheduler.later(self.clock.now, apply)
        for task, action, wake in self._waiting.pop(txn, []):
            if task.alive and task.wake == wake:  # still parked on this call
                self.scheduler.at(self.clock.now, task, action)

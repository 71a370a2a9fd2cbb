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
from google.cloud.datastore_v1.types import datastore as ds_types

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
_TRANSACTIONAL = int(ds_types.CommitRequest.Mode.TRANSACTIONAL)

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
    # applies once the lock is free (a transaction's, only until ``lock_timeout``); a
    # rollback of its transaction answers once it has settled. Off: such a commit is
    # dropped at its deadline, as the protocol once assumed.
    queue_past_deadline: bool = True
    stop_after: int | None = None
    skip_faults: frozenset[int] = frozenset()
    skip_operations: frozenset[int] = frozenset()


def with_short_deadlines(knobs: Knobs) -> Knobs:
    """``knobs`` with deadlines shorter than the engine's lock timeout (2 s), as a search
    also runs Firestore histories: a commit that waits on a lock then outlives its
    caller's deadline, is queued (``queue_past_deadline``), and only a fence of its
    transaction tells when it is over (docs/protocol.md, W6')."""
    return dataclasses.replace(knobs, rpc_timeout=0.5, retry_deadline=3.0)


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
        # a storm's outage: Datastore goes down for this long once a lost reply meets a commit
        self.outage_after_lost_reply = 0.0
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
        self.outage_after_lost_reply = 0.0


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
        self._waiting: dict[bytes, list[tuple[Task, DatastoreCall, int]]] = {}
        self._orphans: dict[bytes, list[Callable[[], None]]] = {}  # queued past deadline
        # transaction -> the rollbacks waiting for its queued commit to settle
        self._unsettled: dict[bytes, list[tuple[Task, DatastoreCall, int]]] = {}
        self.datastore.on_end.append(self._wake_waiters)
        self.checks: list[Callable[[], None]] = []  # run after every event
        self.current: SimProcess | None = None  # whose event is running
        self.cache_failures: dict[int, int] = {}  # by process: cache calls that failed
        self.queued_commits = 0  # commits queued past their callers' deadlines
        self.fences_waited = 0  # rollbacks that waited for such a commit to settle

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
        call = DatastoreCall(self, scheduler, task, effect, sent=now)
        scheduler.at(now + self.draws.uniform(0.002, 0.03), task, call)

    def queue_commit(self, request: Any) -> None:
        """A commit whose caller gave up while it waited on a lock: tried again each time
        the lock it waits on is freed, until it applies or the engine refuses it (a
        transaction's wait ends at ``lock_timeout``). A rollback of its transaction
        waits until then (``DatastoreCall``)."""
        self.queued_commits += 1
        transactional = request.WhichOneof("transaction_selector") == "transaction"
        txn = bytes(request.transaction) if transactional else None
        if txn is not None:
            self._unsettled.setdefault(txn, [])
        state = {"settled": False, "timer": False}

        def apply() -> None:
            if state["settled"]:
                return
            try:
                self.datastore.call("commit", request, self.clock.now)
            except Blocked as blocked:
                self._orphans.setdefault(blocked.holder, []).append(apply)
                waiting = self.datastore.waiting_since(txn) if txn is not None else None
                if waiting is not None and not state["timer"]:
                    # Its lock wait runs out then, and it is refused (a hair later, so
                    # the model's clock sees the whole wait gone by).
                    state["timer"] = True
                    runs_out = max(waiting + self.datastore.lock_timeout, self.clock.now)
                    self.scheduler.later(runs_out + 1e-6, timer)
                return
            except gexc.GoogleAPICallError:
                pass  # refused: it never lands
            state["settled"] = True
            if txn is not None:
                for task, call, wake in self._unsettled.pop(txn, []):
                    call.after_queued_commit = True
                    if task.alive and task.wake == wake:
                        self.scheduler.at(self.clock.now, task, call)

        def timer() -> None:
            state["timer"] = False
            apply()

        apply()

    def in_transaction(self, request: Any, now: float) -> Any:
        """A copy of the single-use commit ``request`` in a transaction begun for it."""
        begun = self.datastore.call("begin_transaction", None, now)
        transactional = type(request)()
        transactional.CopyFrom(request)
        transactional.ClearField("single_use_transaction")
        transactional.mode = _TRANSACTIONAL
        transactional.transaction = begun.transaction
        return transactional

    def commit_queued(self, txn: bytes) -> bool:
        """Is a commit of ``txn`` queued past its caller's deadline, not settled yet?"""
        return txn in self._unsettled

    def wait_for_queued_commit(self, txn: bytes, task: Task, call: DatastoreCall) -> None:
        """Ask the rollback ``call`` of ``txn`` again once its queued commit settles."""
        self._unsettled[txn].append((task, call, task.wake))

    def late_commit(self, scheduler: Scheduler, effect: Rpc, deadline: float) -> None:
        """Apply the commit ``effect`` later, before ``deadline``, whoever waits for it."""

        def apply() -> None:
            # Refused, or it would wait: then it never lands.
            with contextlib.suppress(Blocked, gexc.GoogleAPICallError):
                self.datastore.call("commit", effect.request, self.clock.now)

        scheduler.later(self.draws.uniform(self.clock.now, deadline), apply)

    def park(self, holder: bytes, task: Task, call: DatastoreCall) -> None:
        """``call`` waits on the locks of ``holder``: asked again when it ends."""
        self._waiting.setdefault(holder, []).append((task, call, task.wake))

    def _wake_waiters(self, txn: bytes) -> None:
        for apply in self._orphans.pop(txn, []):
            self.scheduler.later(self.clock.now, apply)
        for task, call, wake in self._waiting.pop(txn, []):
            if task.alive and task.wake == wake:  # still parked on this call
                self.scheduler.at(self.clock.now, task, call)


class DatastoreCall:
    """One Datastore call of a task, answered by the model when the scheduler runs it
    (after its latency, and again each time a lock it waits on may be free)."""

    def __init__(
        self, world: World, scheduler: Scheduler, task: Task, effect: Rpc, *, sent: float
    ) -> None:
        self.world = world
        self.scheduler = scheduler
        self.task = task
        self.effect = effect
        self.request = effect.request
        # A commit in a single-use transaction is one begun for it on the server: it
        # waits on locks, and gives up after ``lock_timeout``, as that transaction.
        self.single_use = (
            effect.method == "commit"
            and effect.request.WhichOneof("transaction_selector") == "single_use_transaction"
        )
        self.deadline = sent + world.knobs.rpc_timeout
        self.queued = False  # a lock held it
        # a rollback that waited for its transaction's queued commit to settle
        self.after_queued_commit = False

    def __call__(self) -> Any:
        world, effect, task = self.world, self.effect, self.task
        now = world.clock.now
        faults = world.faults
        commit = effect.method == "commit"
        if now >= self.deadline and world.knobs.queue_past_deadline and self.queued:
            if commit:
                world.queue_commit(self.request)  # the server holds it, outage or not
            raise google_error(gexc.DeadlineExceeded, "Deadline Exceeded")
        if faults.active("datastore_down", now):
            raise google_error(gexc.ServiceUnavailable, "failed to connect to all addresses")
        if now >= self.deadline:
            raise google_error(gexc.DeadlineExceeded, "Deadline Exceeded")
        if effect.method == "rollback":
            txn = bytes(self.request.transaction)
            if world.commit_queued(txn):
                self.scheduler.at(self.deadline, task, self)  # unless it settles first
                world.wait_for_queued_commit(txn, task, self)
                return PARKED
            if self.after_queued_commit:
                # The Firestore emulator's answer to a rollback that waited for one.
                self.after_queued_commit = False
                world.fences_waited += 1
                raise google_error(gexc.InternalServerError, "Can't swap from CLOSED to ACTIVE.")
        if commit and faults.late_commits:
            faults.late_commits -= 1
            world.late_commit(self.scheduler, effect, self.deadline)
            raise google_error(gexc.ServiceUnavailable, "Connection reset by peer")
        try:
            if self.single_use:
                self.single_use = False
                self.request = world.in_transaction(self.request, now)
            answer = world.datastore.call(effect.method, self.request, now)
        except Blocked as blocked:
            # Asked again when the holder ends, or when this call's waits run out.
            self.queued = True
            wait_until = min(self.deadline, now + world.datastore.lock_timeout)
            self.scheduler.at(max(wait_until, now + 1e-6), task, self)
            world.park(blocked.holder, task, self)
            return PARKED
        except gexc.GoogleAPICallError as exc:
            raise refine_error(exc) from None
        if commit and faults.lost_commits:
            faults.lost_commits -= 1
            if faults.outage_after_lost_reply:
                faults.open("datastore_down", now, faults.outage_after_lost_reply)
                faults.outage_after_lost_reply = 0.0
            raise google_error(gexc.DeadlineExceeded, "Deadline Exceeded")
        return answer

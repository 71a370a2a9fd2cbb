"""One simulated history from a seed, and the search over many seeds.

``run_history(seed, knobs)`` builds a world, starts the logical processes, each
a loop of operations drawn from the seed (plain, keyed and deferred
increments, cached and uncached reads, sets, flushes), injects the faults,
runs until every operation is over, then lets the counter settle (the
faults stop, time passes every deadline, a fresh process repairs) and checks:

* after every event, the invariants ``invariants.py`` watches;
* every read against the history (``history.py``);
* the settled total against the history, and that nothing is left owed.

The ``Outcome`` names the violations with the operations around them; the
same seed gives the same history, event for event.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time as real_time
from collections.abc import Generator
from typing import Any

from google.api_core import exceptions as gexc

from ...core.effects import Sleep
from ...core.stash import Stash
from ...errors import (
    CacheUnavailable,
    CounterOverflowError,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
)
from .clock import VirtualClock, deterministic
from .history import History, Op, describe
from .invariants import Watch
from .world import Knobs, SimProcess, World

#: Virtual seconds a history settles for before its last check: past every fold
#: deadline and claim (core/outcomes.py), so any process may resolve what is left.
SETTLE = 120.0

_PERFECT = real_time.perf_counter  # the wall clock, kept before any history patches it


@dataclasses.dataclass
class Outcome:
    seed: int
    knobs: Knobs
    violations: list[str]
    operations: int
    faults: list[str]
    events: int
    final: int | None
    history: History
    queued_commits: int = 0  # commits queued past their callers' deadlines
    fences_waited: int = 0  # rollbacks that waited for such a commit of theirs to settle

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self, context: int | None = 12) -> str:
        """The violations, the faults, and the last ``context`` operations (all of
        them when ``context`` is None)."""
        lines = [
            f"seed {self.seed} ({self.knobs.engine}): {len(self.violations)} violation(s), "
            f"{self.operations} operations, {self.events} events, {len(self.faults)} faults"
        ]
        lines += [f"  {v}" for v in self.violations[:5]]
        lines += [f"  fault {f}" for f in self.faults]
        if self.violations or context is None:
            ops = self.history.ops if context is None else self.history.ops[-context:]
            lines.append("  the operations:" if context is None else "  the last operations:")
            lines += ["    " + line for line in describe(ops).splitlines()]
        return "\n".join(lines)


#: What each kind of operation's caller may hear, as the public API says it (the
#: facades turn a Datastore error into DatastoreUnavailable), and what it means for
#: the count (history.py): ``no``, never counted; ``maybe``, perhaps. Anything else
#: breaks the error contract (I8), and counts as ``UNHEARD`` says.
HEARD: dict[str, tuple[tuple[tuple[type[Exception], ...], str], ...]] = {
    "increment": (
        ((IncrementNotRecorded, CounterOverflowError), "no"),
        ((IncrementOutcomeUnknown,), "maybe"),
    ),
    "read": (((gexc.GoogleAPICallError,), "no"),),
    # DatastoreUnavailable may have applied; CacheUnavailable: it could not take the
    # stash, and wrote nothing.
    "set": (((gexc.GoogleAPICallError,), "maybe"), ((CacheUnavailable,), "no")),
    # write_pending: DatastoreUnavailable, or memcache down; nothing is lost either way.
    "flush": (((gexc.GoogleAPICallError, CacheUnavailable), "no"),),
}
UNHEARD = {"increment": "maybe", "read": "no", "set": "maybe", "flush": "no"}


class Workload:
    """The operations of one history: each process loops, drawing its next one."""

    def __init__(self, world: World, history: History, watch: Watch) -> None:
        self.world = world
        self.history = history
        self.watch = watch
        self.started = 0
        self.keys: list[str] = []  # idempotency keys used so far: some are retried
        self.key_deltas: dict[str, int] = {}
        self.processes: dict[int, SimProcess] = {}
        self.incarnations = 0
        self.dead: set[int] = set()  # incarnations killed
        # Faults are drawn from a stream of their own, so that leaving one out
        # (shrink.py) leaves the others as they were: the same kinds, at the same
        # operations, with the same parameters.
        self.fault_draws = random.Random(world.draws.getrandbits(64))
        self.fault_at = sorted(
            self.fault_draws.randrange(world.knobs.operations) for _ in range(world.knobs.faults)
        )
        self.faults_drawn = 0
        stop_after = world.knobs.stop_after
        self.last = world.knobs.operations if stop_after is None else stop_after

    # -- processes ------------------------------------------------------------------------

    def spawn(self, pid: int, delay: float = 0.0) -> None:
        self.incarnations += 1
        process = SimProcess(self.world, pid, self.incarnations)
        self.processes[pid] = process
        # Its threads: writers of one process share its picker, slot and cache tier.
        process.tasks = [
            self.world.scheduler.start(process, self.loop(process), lambda _task: None, delay=delay)
            for _ in range(self.world.knobs.threads)
        ]

    def kill(self, pid: int) -> None:
        process = self.processes[pid]
        if any(task.alive for task in process.tasks):
            # Dead before its steps are closed: what they do on the way out (a
            # ``finally``, an ``except BaseException``) is not heard of.
            self.dead.add(process.incarnation)
            for task in process.tasks:
                task.kill()
            self.spawn(pid, delay=self.world.draws.uniform(0.0, 1.0))

    def done(self) -> bool:
        return self.started >= self.last and not any(
            task.alive for p in self.processes.values() for task in p.tasks
        )

    # -- operations -----------------------------------------------------------------------

    def loop(self, process: SimProcess) -> Generator[Any, Any, None]:
        draws = self.world.draws
        while self.started < self.last:
            self.started += 1
            while self.fault_at and self.fault_at[0] < self.started:
                self.fault_at.pop(0)
                self.inject()
            yield from self.operation(process)
            yield Sleep(draws.uniform(0.0, 0.02))

    def operation(self, process: SimProcess) -> Generator[Any, Any, None]:
        draws, paths, now = self.world.draws, process.paths, self.world.clock.now
        roll = draws.random()
        pid = process.incarnation
        if roll < 0.45:
            op = self.history.begin(Op("inc", pid, now, delta=draws.randint(1, 9)))
            yield from self._increment(op, paths.writes.apply(op.delta))
        elif roll < 0.55:
            if self.keys and draws.random() < 0.4:
                key = draws.choice(self.keys)
                delta = self.key_deltas[key]
            else:
                key, delta = f"k{len(self.keys)}", draws.randint(1, 9)
                self.keys.append(key)
                self.key_deltas[key] = delta
            op = self.history.begin(Op("keyed", pid, now, delta=delta, key=key))
            yield from self._keyed(op, process)
        elif roll < 0.62:
            op = self.history.begin(Op("defer", pid, now, delta=draws.randint(1, 9)))
            yield from self._defer(op, process)
        elif roll < 0.78:
            nocache = draws.random() < 0.5
            op = self.history.begin(Op("read_nocache" if nocache else "read", pid, now))
            yield from self._read(op, process, nocache)
        elif roll < 0.83:
            op = self.history.begin(Op("set", pid, now, value=draws.randint(0, 50)))
            yield from self._set(op, process)
        else:
            op = self.history.begin(Op("flush", pid, now))
            yield from self._flush(op, process)

    def _finish(self, op: Op, status: str, error: BaseException | None = None) -> None:
        if op.pid in self.dead:
            return  # its process died: its caller heard nothing
        op.end = self.world.clock.now
        op.status = status
        self.history.changed()
        if error is not None:
            op.error = type(error).__name__

    def _contract(self, what: str, op: Op) -> None:
        if op.pid not in self.dead:
            self.watch.violation(f"I8: {what}: {op}")

    def _carry_out(
        self, kind: str, op: Op, steps: Generator[Any, Any, Any]
    ) -> Generator[Any, Any, Any]:
        """Run ``steps`` for ``op`` and note what its caller heard (``HEARD``); returns
        their answer, or None when they raised (or ``op`` is one shrinking skips)."""
        # ``started`` still numbers this operation: its process yielded nothing since.
        if self.started in self.world.knobs.skip_operations:
            steps.close()
            self.history.ops.remove(op)
            return None
        try:
            answer = yield from steps
        except Exception as exc:
            for errors, status in HEARD[kind]:
                if isinstance(exc, errors):
                    self._finish(op, status, exc)
                    return None
            self._finish(op, UNHEARD[kind], exc)
            self._contract(f"{kind} raised {exc!r}", op)
            return None
        self._finish(op, "ok")
        return answer

    def _increment(self, op: Op, steps: Generator[Any, Any, Any]) -> Generator[Any, Any, None]:
        yield from self._carry_out("increment", op, steps)

    def _keyed(self, op: Op, process: SimProcess) -> Generator[Any, Any, None]:
        def steps() -> Generator[Any, Any, None]:
            errors = yield from process.paths.keyed.write({op.key: op.delta})
            if op.key in errors:
                raise errors[op.key]

        yield from self._increment(op, steps())

    def _defer(self, op: Op, process: SimProcess) -> Generator[Any, Any, None]:
        ctx = process.paths.ctx
        stashes = ctx.backend.cache.steps.stashes

        def steps() -> Generator[Any, Any, None]:
            # Counter.defer: its CacheUnavailable becomes ours as it does there.
            try:
                yield from stashes.stash(ctx.stash_key, op.delta, within_int64=True)
            except CacheUnavailable as exc:
                if exc.maybe_applied:
                    raise IncrementOutcomeUnknown(ctx.name, op.delta, exc) from exc
                raise IncrementNotRecorded(ctx.name, op.delta, exc) from exc

        yield from self._increment(op, steps())

    def _read(self, op: Op, process: SimProcess, nocache: bool) -> Generator[Any, Any, None]:
        failures = self.world.cache_failures.get(process.incarnation, 0)
        op.value = yield from self._carry_out(
            "read", op, process.paths.reader.total(nocache=nocache)
        )
        if op.value is None or op.pid in self.dead:
            return
        cache_failed = self.world.cache_failures.get(process.incarnation, 0) > failures
        slack = self.watch.read_slack(op.start, op.end or op.start, cache_failed=cache_failed)
        problem = self.history.check_read(op, slack)
        if problem is not None:
            self.watch.violation(problem)

    def _set(self, op: Op, process: SimProcess) -> Generator[Any, Any, None]:
        setter = process.paths.setter

        def steps() -> Generator[Any, Any, None]:
            assert op.value is not None
            yield from setter.set_now(setter.checked(op.value))

        yield from self._carry_out("set", op, steps())

    def _flush(self, op: Op, process: SimProcess) -> Generator[Any, Any, None]:
        paths = process.paths

        def steps() -> Generator[Any, Any, None]:
            yield from paths.resolver.resolve(look=True)
            yield from paths.writes.fold_pending()

        yield from self._carry_out("flush", op, steps())

    # -- faults ---------------------------------------------------------------------------

    def inject(self) -> None:
        world, draws = self.world, self.fault_draws
        faults, now = world.faults, world.clock.now
        number = self.faults_drawn
        self.faults_drawn += 1
        kind = draws.choice(
            [
                "datastore_down",
                "lost_commits",
                "late_commits",
                "cache_flaky",
                "cache_down",
                "evict_stash",
                "flush_all",
                "kill",
                "kill",
                "storm",
            ]
        )
        # Every draw is made before deciding whether to inject, so that skipping this
        # fault (shrink.py) leaves the rest of the seed's draws as they were.
        spans = {"datastore_down": (0.1, 1.5), "cache_flaky": (0.5, 3.0), "storm": (0.5, 3.0)}
        seconds = draws.uniform(*spans.get(kind, (0.05, 0.5))) if kind in WINDOWS else 0.0
        restart = kind == "cache_down" and draws.random() < 0.5
        count = {"lost_commits": (1, 3), "late_commits": (1, 2)}.get(kind)
        times = draws.randint(*count) if count else 0
        victim = draws.choice(sorted(self.processes)) if kind == "kill" else -1
        # A storm: commits whose replies are lost, Datastore down from the first of them
        # on, often for longer than a write retries (so that writes end in doubt: a
        # write whose reply is lost no longer waits out a deadline, it fences its
        # transaction at once), while memcache loses replies too.
        storm = (draws.randint(1, 3), draws.uniform(3.0, 15.0)) if kind == "storm" else None
        skipped = number in world.knobs.skip_faults
        faults.injected.append(
            f"#{number} {kind}{' (skipped)' if skipped else ''} at op {self.started}, "
            f"{now:.3f} s"
            + (f" for {seconds:.2f} s" if seconds else "")
            + (" then empty" if restart else "")
            + (f" x{times}" if times else "")
            + (f" of p{self.processes[victim].incarnation}" if victim >= 0 else "")
            + (f": {storm[0]} lost commit(s), Datastore down {storm[1]:.2f} s" if storm else "")
        )
        if skipped:
            return
        if storm:
            faults.lost_commits += storm[0]
            faults.outage_after_lost_reply = storm[1]
            faults.open("cache_flaky", now + 0.3, seconds)
        elif seconds:
            # Long enough to overlap: a write that failed at Datastore meets a flaky cache.
            faults.open(kind, now, seconds)
            if restart:
                self._lose_everything("a memcached restart")  # down, then back empty
        elif kind == "lost_commits":
            faults.lost_commits += times
        elif kind == "late_commits":
            faults.late_commits += times
        elif kind == "evict_stash":
            self._lose_key(self._stash_key(), "an eviction of delayed_incr")
        elif kind == "flush_all":
            self._lose_everything("flush_all")
        else:
            # As an event of its own: the process drawing this fault may be the victim.
            world.scheduler.later(now, lambda: self.kill(victim))

    def _stash_key(self) -> str:
        return next(iter(self.processes.values())).paths.ctx.stash_key

    def _lose_key(self, key: str, why: str) -> None:
        raw = self.world.memcache.peek(key)
        if raw is not None:
            self.history.lost(self.world.clock.now, *held_in(raw), why)
        self.world.memcache.evict(key)

    def _lose_everything(self, why: str) -> None:
        raw = self.world.memcache.peek(self._stash_key())
        if raw is not None:
            self.history.lost(self.world.clock.now, *held_in(raw), why)
        self.world.memcache.flush_all()


#: The faults that last a while (``Window``): drawn with how long.
WINDOWS = frozenset({"datastore_down", "cache_flaky", "cache_down", "storm"})


def held_in(raw: bytes) -> tuple[int, int]:
    """What a stash holds that memcache would lose with it: everything it owes readers
    and what folds in flight took (their put-back would find no marker); and what is
    in flight to a shard under a marker a set would fence (folds, and unsure writes a
    resolver has claimed), which no set can fence now."""
    try:
        stash = Stash.parse(raw)
    except Exception:
        return 0, 0  # a garbled stash is the watch's to report
    folds = sum(fold.amount for fold in stash.folds.values())
    claimed = sum(u.amount for u in stash.unsure.values() if u.claim)
    return stash.owed + folds, folds + claimed


def run_history(seed: int, knobs: Knobs | None = None) -> Outcome:
    """Simulate one history from ``seed`` and check it (see the module docstring)."""
    knobs = knobs or Knobs()
    clock = VirtualClock()
    logger = logging.getLogger("sharded_counter")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # the protocol's warnings: thousands per minute
    try:
        with deterministic(clock, seed) as draws:
            return _simulate(seed, knobs, clock, draws)
    finally:
        logger.setLevel(level)


def _simulate(seed: int, knobs: Knobs, clock: VirtualClock, draws: Any) -> Outcome:
    world = World(knobs, clock, draws)
    history = History(slack=knobs.rpc_timeout)
    watch = Watch(world, history)
    workload = Workload(world, history, watch)
    for pid in range(knobs.processes):
        workload.spawn(pid)
    scheduler = world.scheduler
    budget = 400 * knobs.operations + 20_000
    scheduler.run(workload.done, max_events=budget)
    scheduler.run(lambda: False, max_events=budget)  # what is still due: late commits
    # Settle: no more faults; every deadline passes; a fresh process repairs.
    world.faults.off()
    clock.now += SETTLE
    final: int | None = None
    repairer = SimProcess(world, knobs.processes, workload.incarnations + 1)
    result: dict[str, Any] = {}

    def repair() -> Generator[Any, Any, None]:
        paths = repairer.paths
        yield from paths.resolver.resolve(look=True)
        yield from paths.writes.fold_pending()
        result["total"] = yield from paths.reader.total(nocache=True)

    task = scheduler.start(repairer, repair(), lambda _t: None)
    scheduler.run(lambda: not task.alive, max_events=budget)
    if task.failure is not None:
        watch.violation(f"the settling repair failed: {task.failure!r}")
    else:
        final = result["total"]
        low, high = history.bounds(clock.now, clock.now)
        if not low <= final <= high:
            watch.violation(f"the settled total is {final}, outside [{low}, {high}]")
        watch.settled(final)
    return Outcome(
        seed=seed,
        knobs=knobs,
        violations=watch.violations,
        operations=len(history.ops),
        faults=world.faults.injected,
        events=scheduler.events,
        final=final,
        history=history,
        queued_commits=world.queued_commits,
        fences_waited=world.fences_waited,
    )

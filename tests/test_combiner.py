"""Group commit (paths/combiner.py): its rules in isolation, then on the real backends.

The first tests drive ``WriteCombiner`` with a plain function standing in for
the shard write, because they must hold writes in flight at chosen moments;
the last ones run real Counters against both engines and memcached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from sharded_counter import Counter, CounterOverflowError, IncrementNotRecorded
from sharded_counter.paths.combiner import WriteCombiner
from sharded_counter.paths.slots import SLOW


class GatedWrites:
    """A write function that records every amount and blocks until released."""

    def __init__(self) -> None:
        self.amounts: list[int] = []
        self.gate = threading.Event()
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, amount: int) -> None:
        with self._lock:
            self.amounts.append(amount)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.gate.wait(10)
        with self._lock:
            self.running -= 1


def start(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def queued(combiner: WriteCombiner) -> int:
    return sum(len(group.deltas) for group in combiner._queue)


def closed_loop_groups(writers: int, write_seconds: float, rounds: int) -> list[int]:
    """``writers`` threads each increment by 1, ``rounds`` times, straight back each time,
    through one combiner whose write takes ``write_seconds``; the size of every group."""
    combiner, sizes = WriteCombiner(), []

    def write(amount: int) -> None:
        sizes.append(amount)
        time.sleep(write_seconds)

    def loop() -> None:
        for _ in range(rounds):
            combiner.run(1, write, limit=1, max_total=2**32)

    threads = [start(loop) for _ in range(writers)]
    for thread in threads:
        thread.join(60)
    assert sum(sizes) == writers * rounds
    return sizes


def test_writers_that_come_straight_back_make_full_groups() -> None:
    # With one write in flight and no waiting, 4 writers looping made groups of 2: the
    # half in the write, and the half queued behind it (slots.Returns). The first
    # writes teach the combiner how soon writers come back, so only the later count.
    sizes = closed_loop_groups(writers=4, write_seconds=0.1, rounds=12)
    later = sizes[len(sizes) // 2 :]
    assert sum(later) / len(later) > 3.0, sizes


def behind_one_write(
    combiner: WriteCombiner, run: Callable[[int], None], deltas: list[int], release: threading.Event
) -> None:
    """``run(1)`` takes the only slot and holds it until ``release``; ``deltas`` queue behind it."""
    busy = start(lambda: run(1))
    wait_until(lambda: combiner._running == 1)
    members = []
    for count, delta in enumerate(deltas, 1):  # one at a time: the queue keeps the list's order
        members.append(start(lambda d=delta: run(d)))
        wait_until(lambda n=count: queued(combiner) == n)
    release.set()
    for thread in [busy, *members]:
        thread.join(10)
        assert not thread.is_alive()


def test_without_group_commit_writes_start_at_once_up_to_the_limit() -> None:
    # group_commit=False (eager): the rule before adaptive slots, kept for one write
    # per increment; only increments beyond the limit share a write.
    combiner, writes = WriteCombiner(), GatedWrites()

    def run(delta: int) -> Callable[[], None]:
        return lambda: combiner.run(delta, writes, limit=2, max_total=2**32, eager=True)

    first = [start(run(1)), start(run(2))]
    wait_until(lambda: writes.running == 2)
    waiting = [start(run(d)) for d in (10, 20, 30, -5)]
    wait_until(lambda: queued(combiner) == 4)
    writes.gate.set()
    for thread in first + waiting:
        thread.join(10)
        assert not thread.is_alive()
    assert sorted(writes.amounts) == [1, 2, 55]
    assert writes.most_running == 2


def patient(combiner: WriteCombiner, seconds: float) -> WriteCombiner:
    """Make ``combiner``'s queued groups wait ``seconds`` for a slot before opening one
    (as if its writes usually took a tenth of that): the tests decide, not the clock."""
    combiner._times.usual = seconds / SLOW
    return combiner


def test_one_write_in_flight_and_everything_behind_it_shares_the_next() -> None:
    combiner, writes = patient(WriteCombiner(), 600.0), GatedWrites()

    def run(delta: int) -> Callable[[], None]:
        return lambda: combiner.run(delta, writes, limit=4, max_total=2**32)

    first = start(run(1))
    wait_until(lambda: writes.running == 1)
    waiting = [start(run(d)) for d in (10, 20, 30, -5)]
    wait_until(lambda: queued(combiner) == 4)
    assert writes.amounts == [1]  # below the limit, yet nobody else started a write
    writes.gate.set()
    for thread in [first, *waiting]:
        thread.join(10)
        assert not thread.is_alive()
    assert writes.amounts == [1, 55]
    assert writes.most_running == 1


def test_a_group_behind_a_slow_write_opens_another_slot_up_to_the_limit() -> None:
    combiner, writes = WriteCombiner(), GatedWrites()

    def run(delta: int) -> Callable[[], None]:
        return lambda: combiner.run(delta, writes, limit=2, max_total=2**32)

    first = start(run(1))
    wait_until(lambda: writes.running == 1)
    patient(combiner, 0.05)  # the held write is "slow" after 50 ms
    second = [start(run(d)) for d in (10, 20)]
    wait_until(lambda: writes.running == 2)  # the group went around the held write
    assert sorted(writes.amounts) == [1, 30]
    third = [start(run(d)) for d in (100, 200)]
    wait_until(lambda: queued(combiner) == 2)
    time.sleep(0.3)  # six times the patience: the limit, not the clock, holds it now
    assert writes.most_running == 2
    assert queued(combiner) == 2
    writes.gate.set()
    for thread in [first, *second, *third]:
        thread.join(10)
        assert not thread.is_alive()
    assert sorted(writes.amounts) == [1, 30, 300]
    assert combiner._running == 0


def test_a_group_never_grows_past_max_total() -> None:
    combiner, writes = WriteCombiner(), GatedWrites()
    behind_one_write(
        combiner,
        lambda d: combiner.run(d, writes, limit=1, max_total=100),
        [60, 50, 500],
        writes.gate,
    )
    assert sorted(writes.amounts) == [1, 50, 60, 500]


def test_deltas_that_cancel_out_write_nothing() -> None:
    combiner, writes = WriteCombiner(), GatedWrites()
    behind_one_write(
        combiner, lambda d: combiner.run(d, writes, limit=1, max_total=100), [7, -7], writes.gate
    )
    assert writes.amounts == [1]
    assert combiner._running == 0


def test_a_group_that_overflows_is_written_member_by_member() -> None:
    combiner, gate = WriteCombiner(), threading.Event()
    written: list[int] = []

    def write(amount: int) -> None:
        if amount == 1:
            gate.wait(10)  # holds the only slot while the group forms
        if amount > 100:
            raise CounterOverflowError("too much")
        written.append(amount)

    outcomes: dict[int, str] = {}

    def run(delta: int) -> None:
        try:
            combiner.run(delta, write, limit=1, max_total=1000)
            outcomes[delta] = "ok"
        except CounterOverflowError:
            outcomes[delta] = "overflow"

    behind_one_write(combiner, run, [60, 70, 200], gate)
    assert sorted(written) == [1, 60, 70]
    assert outcomes == {1: "ok", 60: "ok", 70: "ok", 200: "overflow"}


def test_each_member_of_a_lost_group_is_told_its_own_delta() -> None:
    combiner, gate = WriteCombiner(), threading.Event()

    def write(amount: int) -> None:
        if amount == 1:
            gate.wait(10)
            return
        raise IncrementNotRecorded("c", amount, ConnectionError("memcache down"))

    told: dict[int, int] = {}

    def run(delta: int) -> None:
        try:
            combiner.run(delta, write, limit=1, max_total=1000)
        except IncrementNotRecorded as exc:
            told[delta] = exc.delta
            assert isinstance(exc.__cause__, ConnectionError)

    behind_one_write(combiner, run, [10, 20, 30], gate)
    assert told == {10: 10, 20: 20, 30: 30}


@pytest.mark.backends
def test_sixteen_threads_share_writes_and_count_exactly(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = Counter("grouped", shards=20, max_concurrent_writes=2)
    assert counter.count == 0  # cached, so every write also merges into the record
    store = counter._backend.store
    commits = 0
    real_commit = store.commit

    def counting_commit(*args: object, **kwargs: object) -> object:
        nonlocal commits
        commits += 1
        return real_commit(*args, **kwargs)  # type: ignore[arg-type]

    # The store is the process's own, shared by later tests: monkeypatch puts it back.
    monkeypatch.setattr(store, "commit", counting_commit)
    threads = [
        threading.Thread(target=lambda: [counter.increment(3) for _ in range(25)])
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.get_count(nocache=True) == 16 * 25 * 3
    assert counter.count == 16 * 25 * 3
    assert commits < 16 * 25  # writes were shared


@pytest.mark.backends
def test_a_read_right_after_a_shared_increment_sees_it(sharded_counter_env: dict[str, str]) -> None:
    counter = Counter("read-after", shards=5, max_concurrent_writes=1)
    assert counter.count == 0
    failures: list[str] = []
    lock = threading.Lock()
    done = {"n": 0}

    def writer() -> None:
        for _ in range(20):
            counter.increment()
            with lock:
                done["n"] += 1
                floor = done["n"]
            seen = counter.count
            if seen < floor:
                failures.append(f"saw {seen} after {floor} increments returned")

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert counter.count == 160


def test_exclusive_waits_for_running_writes_and_holds_new_ones_until_it_ends() -> None:
    combiner, writes = WriteCombiner(), GatedWrites()
    running = start(lambda: combiner.run(1, writes, limit=4, max_total=100))
    wait_until(lambda: writes.running == 1)
    inside = threading.Event()
    leave = threading.Event()

    def hold() -> None:
        with combiner.exclusive():
            inside.set()
            leave.wait(10)

    holder = start(hold)
    assert not inside.wait(0.2), "exclusive() did not wait for the running write"
    writes.gate.set()
    assert inside.wait(10)
    held = [start(lambda d=d: combiner.run(d, writes, limit=4, max_total=100)) for d in (2, 3)]
    wait_until(lambda: queued(combiner) == 2)
    assert writes.amounts == [1]  # nothing started while held
    leave.set()
    for thread in [running, holder, *held]:
        thread.join(10)
        assert not thread.is_alive()
    assert writes.amounts == [1, 5]  # the held increments went out together
    assert combiner._running == 0

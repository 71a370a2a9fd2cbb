"""``AsyncCounter`` with 64 tasks in one event loop against ``Counter`` with 16 threads.

Both add ``count`` increments of 1 to a fresh counter of ``SHARDS`` shards, as
fast as their writers go, with their default group commit (what an app gets),
and stop; the rate is ``count`` over the time until the last writer stopped,
and the client CPU is this process's (``time.process_time``: every thread,
gRPC's included). The two take turns, a race each per repeat of the run, and
their ratio is the median of the races' ratios, as for the other paired loops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid

from ...aio import AsyncCounter, aclose
from ...counter import Counter
from .contenders import SHARDS
from .results import Timed

TASKS = 64
THREADS = 16


def _threads(engine: str, count: int) -> tuple[float, float, int]:
    """One race of the blocking Counter: (seconds, CPU seconds, wrong answers)."""
    counter = Counter(f"bench-threads-{engine}-{uuid.uuid4().hex[:8]}", shards=SHARDS)
    counter.get_count()  # cached before the clock starts, as for the other contenders
    each, extra = divmod(count, THREADS)
    wrong = [0] * THREADS

    def write(i: int) -> None:
        for _ in range(each + (i < extra)):
            try:
                counter.increment()
            except Exception:  # any answer but success is a wrong one here
                wrong[i] += 1

    workers = [threading.Thread(target=write, args=(i,)) for i in range(THREADS)]
    cpu, began = time.process_time(), time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds, cpu = time.monotonic() - began, time.process_time() - cpu
    total = counter.get_count(nocache=True)
    return seconds, cpu, sum(wrong) + int(total != count) + int(counter.count != count)


def _tasks(engine: str, count: int) -> tuple[float, float, int]:
    """One race of AsyncCounter in a fresh event loop: (seconds, CPU seconds, wrong)."""

    async def race() -> tuple[float, float, int]:
        counter = AsyncCounter(f"bench-tasks-{engine}-{uuid.uuid4().hex[:8]}", shards=SHARDS)
        await counter.get_count()  # connected and cached before the clock starts
        each, extra = divmod(count, TASKS)
        wrong = 0

        async def write(i: int) -> None:
            nonlocal wrong
            for _ in range(each + (i < extra)):
                try:
                    await counter.increment()
                except Exception:
                    wrong += 1

        cpu, began = time.process_time(), time.monotonic()
        await asyncio.gather(*(write(i) for i in range(TASKS)))
        seconds, cpu = time.monotonic() - began, time.process_time() - cpu
        total = await counter.get_count(nocache=True)
        cached = await counter.get_count()
        await aclose()
        return seconds, cpu, wrong + int(total != count) + int(cached != count)

    return asyncio.run(race())


@dataclasses.dataclass
class _Races:
    seconds: float = 0.0
    cpu: float = 0.0
    wrong: int = 0
    rates: list[float] = dataclasses.field(default_factory=list)


def measure_aio(engine: str, count: int, rounds: int) -> list[Timed]:
    """The two races, in turns (see the module docstring)."""
    races = {"counter-threads-16": _threads, "aio-tasks-64": _tasks}
    labels = {
        "counter-threads-16": f"Counter, {THREADS} threads, {count:,} increments",
        "aio-tasks-64": f"AsyncCounter, {TASKS} tasks in one event loop, {count:,} increments",
    }
    totals = {name: _Races() for name in races}
    for _ in range(rounds):
        for name, race in races.items():
            seconds, cpu, wrong = race(engine, count)
            total = totals[name]
            total.seconds += seconds
            total.cpu += cpu
            total.wrong += wrong
            total.rates.append(count / seconds if seconds else 0.0)
    return [
        Timed(
            name,
            labels[name],
            count * rounds,
            total.seconds,
            total.wrong,
            cpu=total.cpu,
            detail=f"{rounds} races of {count:,} increments",
            round_rates=tuple(total.rates),
        )
        for name, total in totals.items()
    ]

"""A ``BoundedCounter`` filling its room: far from its bound, and in the last 5 % of it.

Both race ``THREADS`` writer threads to add ``room`` increments of 1 and stop:
*far*, on a counter whose maximum is a thousand times that away; *last 5 %*,
on a counter laid out at 95 % of a maximum 20 times ``room``, whose writers
go on until it refuses them, so its shards' shares run dry and the writers
borrow, then are refused. The rate is ``room`` over the time until the last
writer stopped. The two take turns, a round each per repeat of the run, and
their ratio is the median of the rounds' ratios, as for the one-thread loops.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import uuid

from ...bounded import BoundedCounter
from ...errors import LimitReached
from .contenders import SHARDS
from .results import Timed

THREADS = 16


def _fill(engine: str, maximum: int, start: int, room: int) -> tuple[int, float, float, int]:
    """One race: (acknowledged, seconds, CPU seconds, wrong answers)."""
    counter = BoundedCounter(
        f"bench-fill-{engine}-{uuid.uuid4().hex[:8]}", maximum=maximum, shards=SHARDS
    )
    counter.count = start  # laid out before the clock starts
    counter.get_count()  # and its total cached, as for the other contenders
    issued = itertools.count()  # next() on a count is atomic in CPython
    last_five = maximum - start == room
    acked = [0] * THREADS
    wrong = [0] * THREADS

    def write(i: int) -> None:
        while last_five or next(issued) < room:
            try:
                counter.increment()
            except LimitReached:
                if last_five:
                    return  # the room is gone: this writer is done
                wrong[i] += 1
            except Exception:  # any other answer is a wrong one here
                wrong[i] += 1
            else:
                acked[i] += 1

    workers = [threading.Thread(target=write, args=(i,)) for i in range(THREADS)]
    cpu, began = time.process_time(), time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds, cpu = time.monotonic() - began, time.process_time() - cpu
    done = sum(acked)
    total = counter.get_count(nocache=True)
    errors = sum(wrong) + int(done != room) + int(total != start + done)
    return done, seconds, cpu, errors


@dataclasses.dataclass
class _Races:
    done: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    wrong: int = 0
    rates: list[float] = dataclasses.field(default_factory=list)


def measure_fill(engine: str, room: int, rounds: int) -> list[Timed]:
    """The far and last-5 % races, in turns (see the module docstring)."""
    races = {
        "bounded-fill-far": (1000 * room, 0),
        "bounded-fill-last5": (20 * room, 19 * room),
    }
    labels = {
        "bounded-fill-far": f"BoundedCounter, {THREADS} threads, {room:,} far from its maximum",
        "bounded-fill-last5": f"BoundedCounter, {THREADS} threads, its last {room:,} (5%)",
    }
    totals = {name: _Races() for name in races}
    for _ in range(rounds):
        for name, (maximum, start) in races.items():
            done, seconds, cpu, wrong = _fill(engine, maximum, start, room)
            total = totals[name]
            total.done += done
            total.seconds += seconds
            total.cpu += cpu
            total.wrong += wrong
            total.rates.append(done / seconds if seconds else 0.0)
    return [
        Timed(
            name,
            labels[name],
            total.done,
            total.seconds,
            total.wrong,
            cpu=total.cpu,
            detail=f"{rounds} races of {room:,} increments",
            round_rates=tuple(total.rates),
        )
        for name, total in totals.items()
    ]

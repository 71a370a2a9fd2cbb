"""The same race from several processes at once (spawned), on one counter.

Threads in one CPython process share one GIL, so past a point more writer
threads add waiting, not throughput. Processes each bring their own; on a
2-core machine shared with the emulator there is little room either way,
which is what this run shows. Each child opens the contender on the shared
name, waits at a barrier so all start together, and sends back its tally
and call counts; the parent checks the total once every child is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ..warning_tally import tally_warnings
from .contenders import BY_KEY, Contender
from .cpu import CpuMark
from .load import Load, combine, drive
from .measure import fresh_name
from .results import Point
from .rpc_count import CallCounter, counting

_START_TIMEOUT = 120.0  # spawning imports the whole client library afresh


@dataclasses.dataclass(frozen=True)
class _Job:
    contender: str
    name: str
    env: dict[str, str]
    threads: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class _Report:
    load: Load | None
    aborts: int | None
    rpcs: dict[str, int]
    memcache: dict[str, int]
    cpu: float
    warnings: dict[str, int]
    error: str = ""
    entities: int = 0
    shards_in_use: int | None = None


def _child(job: _Job, barrier: Any, reports: Any) -> None:
    """A spawned writer process (module level, so the child can import it)."""
    try:
        os.environ.update(job.env)
        target = BY_KEY[job.contender].open(job.name, job.seconds)
        rpcs, memcache = CallCounter(), CallCounter()
        with (
            tally_warnings() as warnings,
            counting(target.rpc_slots, rpcs),
            counting(target.cache_slots, memcache),
        ):
            barrier.wait(_START_TIMEOUT)
            cpu = time.process_time()
            load = drive(
                target.increment,
                job.threads,
                job.seconds,
                batch=BY_KEY[job.contender].batch,
                settle=target.settle,
            )
            cpu = time.process_time() - cpu
        aborts = target.aborts() if target.aborts is not None else None
        reports.put(
            _Report(
                load,
                aborts,
                rpcs.snapshot(),
                memcache.snapshot(),
                cpu,
                dict(warnings.counts),
                entities=rpcs.written(),
                shards_in_use=None if target.shards_in_use is None else target.shards_in_use(),
            )
        )
    except BaseException as exc:
        barrier.abort()  # nobody waits for a child that will never arrive
        reports.put(_Report(None, None, {}, {}, 0.0, {}, f"{type(exc).__name__}: {exc}"))


def measure_processes(
    contender: Contender,
    engine: str,
    processes: int,
    threads: int,
    seconds: float,
    watch: Mapping[str, int | None],
) -> Point:
    """``processes`` processes of ``threads`` writer threads each, on one shared name."""
    context = multiprocessing.get_context("spawn")  # fork would share gRPC's threads
    name = fresh_name(contender.key, engine, processes * threads)
    # Opened here first: the check is made here, and a cached total is primed once.
    target = contender.open(name, seconds)
    barrier = context.Barrier(processes + 1)
    reports = context.Queue()
    job = _Job(contender.key, name, dict(os.environ), threads, seconds)
    children = [
        context.Process(target=_child, args=(job, barrier, reports), daemon=True)
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(_START_TIMEOUT)  # broken when a child failed to start: its report says why
    before = CpuMark.now(watch)
    done = [reports.get(timeout=_START_TIMEOUT + 2 * seconds + 60) for _ in children]
    elapsed = time.monotonic() - before.wall
    cpu = CpuMark.now(watch).since(before)
    for child in children:
        child.join(timeout=30)
    failed = [r.error for r in done if r.error]
    if failed:
        raise RuntimeError(f"a writer process failed: {failed[0]}")
    loads = [r.load for r in done if r.load is not None]
    load = combine(loads, elapsed)
    cpu["client"] = (cpu["client"] or 0.0) + sum(r.cpu for r in done)
    aborts = [r.aborts for r in done]
    return Point(
        engine=engine,
        contender=contender.key,
        label=contender.label,
        write_mode=target.write_mode,
        threads=threads,
        processes=processes,
        seconds=seconds,
        load=load,
        check=target.check(load.expected),
        aborts=None if None in aborts else sum(a for a in aborts if a is not None),
        rpcs=_sum_calls(r.rpcs for r in done),
        memcache=_sum_calls(r.memcache for r in done),
        cpu=cpu,
        warnings=_sum_calls(r.warnings for r in done),
        entities=sum(r.entities for r in done),
        shards_in_use=tuple(r.shards_in_use for r in done if r.shards_in_use is not None),
    )


def _sum_calls(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for method, n in part.items():
            total[method] = total.get(method, 0) + n
    return dict(sorted(total.items()))

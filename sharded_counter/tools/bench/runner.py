"""One bench run: start the backends, measure every contender on each engine, report.

Each engine gets its own emulator, started with memcached by one
``BackendStack`` (and a redis-server of the run's own when Redis is measured),
and the environment points at it only while its part runs (as in the demo).
Each engine is measured with each cache kind in turn: memcached
(``MEMCACHED_HOSTS``), then Redis (``SHARDED_COUNTER_CACHE_URL``), the library
reconnecting in between. Within one part the contenders take turns at each
thread count, so a contender and the blind puts it is compared with run
close together in time. The emulator is reset between measurements, so each
starts from the same empty store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from ...errors import ConfigurationError
from ...process import reconnect
from . import chart, report
from .aio import measure_aio
from .contenders import CONTENDERS
from .fill import measure_fill
from .load import drive
from .measure import measure
from .micro import measure_buffer, measure_reads
from .options import BenchOptions
from .procs import measure_processes
from .results import EngineResults, Point, machine
from .targets import TARGET_THREADS, TargetResult, evaluate

if TYPE_CHECKING:
    from sharded_counter_emulator import BackendStack, DatastoreEmulator, RedisServer

JSON_NAME = "bench.json"
CACHE_URL_ENV = "SHARDED_COUNTER_CACHE_URL"
CHART_NAME = "bench.png"


@dataclasses.dataclass
class BenchOutcome:
    """What ``run`` found, and where it was written."""

    engines: dict[str, EngineResults]
    targets: list[TargetResult]
    data: dict[str, Any]  # what went into the JSON file
    json_path: Path
    chart_path: Path | None

    @property
    def exact(self) -> bool:
        return all(results.exact for results in self.engines.values())


def run(options: BenchOptions, console: Console) -> BenchOutcome:
    """Run the whole bench; raises the emulator package's errors when a backend won't start."""
    # Imported here, as the demo does: only the bench and the demo need the emulators.
    from sharded_counter_emulator import BackendStack, RedisServer

    started = time.monotonic()
    host = machine()  # before the run: its load average is the machine's own, not ours
    engines: dict[str, EngineResults] = {}
    if "redis" in options.caches:
        _need_redis_py()  # before any server starts
    with console.status(f"starting {', '.join(options.engines)} emulator(s) and memcached..."):
        stack = BackendStack(engines=options.engines, memcached=1).start()
    redis: RedisServer | None = None
    try:
        if "redis" in options.caches:
            redis = RedisServer().start()
        console.print(f"backends up in {time.monotonic() - started:.1f}s")
        for engine in options.engines:
            with stack.activated(engine):
                for cache in options.caches:
                    with _pointed_at(cache, redis):
                        results = _bench_engine(engine, cache, stack, redis, options, console)
                    engines[results.key] = results
    finally:
        if redis is not None:
            redis.stop()
        stack.stop()
    targets = evaluate(engines)
    outcome = _write(options, host, engines, targets, time.monotonic() - started)
    console.rule("summary")
    console.print(report.targets_table(targets))
    _verdict(console, outcome, time.monotonic() - started)
    return outcome


def _need_redis_py() -> None:
    # Checked first: minutes of memcached points should not end in an ImportError
    # when the Redis part begins.
    if importlib.util.find_spec("redis") is None:
        raise ConfigurationError(
            "the bench measures Redis with redis-py: pip install 'sharded-counter[redis]' "
            "(or leave Redis out with --caches memcached)"
        )


@contextlib.contextmanager
def _pointed_at(cache: str, redis: RedisServer | None) -> Iterator[None]:
    """The library's cache is ``cache`` for the block: Redis through its URL (which wins
    over MEMCACHED_HOSTS), memcached without one. Spawned writer processes inherit it."""
    url = redis.url if cache == "redis" and redis is not None else None
    saved = os.environ.get(CACHE_URL_ENV)
    _set_env(CACHE_URL_ENV, url)
    reconnect()  # counters and helpers made from here on, and old ones, connect afresh
    try:
        yield
    finally:
        _set_env(CACHE_URL_ENV, saved)
        reconnect()


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _bench_engine(
    engine: str,
    cache: str,
    stack: BackendStack,
    redis: RedisServer | None,
    options: BenchOptions,
    console: Console,
) -> EngineResults:
    console.rule(report.title(engine, cache))
    began = time.monotonic()
    emulator = stack.emulator(engine)
    server = redis if cache == "redis" and redis is not None else stack.memcached[0]
    # The cache server's CPU is charged under "memcached" whichever kind it is.
    watch = {"emulator": emulator.pgid, "memcached": server.pgid}
    results = EngineResults(engine, cache)
    _warm_up(engine, options)
    # The blind puts first, then the target's contenders right after them, so the
    # ratios the targets are about compare measurements taken close together.
    first = (
        "blind",
        "counter",
        "counter-default",
        "bounded",
        "counter-solo",
        "counter-unread",
        "transform-20",
    )
    contenders = sorted(
        (c for c in CONTENDERS if c.runs_on(engine, cache)),
        key=lambda c: first.index(c.key) if c.key in first else len(first),
    )
    # "n/a": what this cache kind measures but the engine cannot run. Contenders left
    # out of a cache kind by choice (Contender.caches) are not listed.
    results.not_applicable = {
        c.key: c.unsupported for c in CONTENDERS if cache in c.caches and engine not in c.engines
    }
    # Repeats interleave: every point once, then every point again, so that a slow
    # spell of the machine or the emulator hits one repeat of many points, not every
    # repeat of one; a point's figure is its median repeat.
    for repeat in range(options.repeats):
        for threads in options.threads:
            for contender in (c for c in contenders if c.threads):
                point = measure(contender, engine, threads, options.seconds, watch)
                point = dataclasses.replace(point, repeat=repeat, cache=cache)
                _record(console, results, point, emulator)
        for processes, threads in options.layouts:
            for contender in (c for c in contenders if c.processes):
                point = measure_processes(
                    contender, engine, processes, threads, options.seconds, watch
                )
                point = dataclasses.replace(point, repeat=repeat, cache=cache)
                _record(console, results, point, emulator)
    results.reads = measure_reads(engine, cache, server.address, options.micro_seconds)
    if cache == "memcached":
        # In-process loops and races whose targets are memcached's alone.
        results.buffer = measure_buffer(engine, options.micro_seconds)
        results.fill = measure_fill(engine, options.fill_room, options.repeats)
        results.aio = measure_aio(engine, options.aio_count, options.repeats)
    results.summarize()
    results.seconds = time.monotonic() - began
    calls_at = TARGET_THREADS if TARGET_THREADS in options.threads else max(options.threads)
    report.print_engine(console, results, calls_at)
    return results


def _warm_up(engine: str, options: BenchOptions) -> None:
    """Untimed load on both write paths, so the emulator's JIT is warm for the first point."""
    if not options.warmup_seconds:
        return
    for contender in (c for c in CONTENDERS if c.key in ("blind", "counter")):
        target = contender.open(f"bench-warm-up-{contender.key}-{engine}", options.warmup_seconds)
        drive(target.increment, 8, options.warmup_seconds / 2)


def _record(
    console: Console, results: EngineResults, point: Point, emulator: DatastoreEmulator
) -> None:
    results.points.append(point)
    # Every measurement starts on an empty store; its own check has been made.
    emulator.reset()
    status = Text("exact", style="green") if point.exact else Text("NOT EXACT", style="bold red")
    writers = point.threads if point.processes == 1 else f"{point.processes}x{point.threads}"
    console.print(
        Text.assemble(
            f"  {point.label:<40} {writers!s:>5} writers {point.rate:>12,.1f} incr./s  ", status
        )
    )


def _write(
    options: BenchOptions,
    host: dict[str, Any],
    engines: Mapping[str, EngineResults],
    targets: list[TargetResult],
    seconds: float,
) -> BenchOutcome:
    data: dict[str, Any] = {
        "machine": host,
        "options": {
            "engines": list(options.engines),
            "caches": list(options.caches),
            "threads": list(options.threads),
            "seconds": options.seconds,
            "repeats": options.repeats,
            "layouts": [list(layout) for layout in options.layouts],
            "micro_seconds": options.micro_seconds,
            "warmup_seconds": options.warmup_seconds,
            "fill_room": options.fill_room,
            "aio_count": options.aio_count,
        },
        "wall_seconds": seconds,
        "exact": all(r.exact for r in engines.values()),
        "engines": {engine: results.to_json() for engine, results in engines.items()},
        "targets": [t.to_json() for t in targets],
    }
    json_path = options.out / JSON_NAME
    report.write_json(json_path, data)
    chart_path = None
    if options.chart:
        chart_path = options.out / CHART_NAME
        titles = {key: report.title(r.engine, r.cache) for key, r in engines.items()}
        chart.draw(chart_path, data, titles)
    return BenchOutcome(dict(engines), targets, data, json_path, chart_path)


def _verdict(console: Console, outcome: BenchOutcome, seconds: float) -> None:
    written = [str(outcome.json_path)]
    if outcome.chart_path is not None:
        written.append(str(outcome.chart_path))
    console.print(f"wrote {' and '.join(written)}; the bench took {seconds:.0f}s")
    if outcome.exact:
        console.print(Text("every count was exact", style="bold green"))
    else:
        console.print(Text("FAILED: some count was NOT exact (see above)", style="bold red"))

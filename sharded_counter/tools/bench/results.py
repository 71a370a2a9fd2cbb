"""The numbers one bench run produces, and their JSON form."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from .contenders import Check
from .load import Load


def percentiles(latencies: Sequence[float]) -> tuple[float | None, float | None]:
    """p50 and p99 of ``latencies`` (seconds), in milliseconds; None without any."""
    if not latencies:
        return None, None
    ordered = sorted(latencies)
    return 1e3 * _rank(ordered, 0.50), 1e3 * _rank(ordered, 0.99)


def _rank(ordered: Sequence[float], q: float) -> float:
    # The nearest-rank percentile: a value that was measured, never an interpolation.
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


@dataclasses.dataclass(frozen=True)
class Spread:
    """One point over the run's repeats: the median and the range of what varies."""

    repeats: int
    rate_min: float
    rate_max: float
    ratio_min: float | None  # of the round-by-round ratios to the blind puts
    ratio_max: float | None
    latency_p50_ms: float | None  # over every increment of every repeat
    latency_p99_ms: float | None


@dataclasses.dataclass
class Point:
    """One contender at one concurrency on one engine."""

    engine: str
    contender: str
    label: str
    write_mode: str
    threads: int  # writer threads per process
    processes: int
    seconds: float  # the time box
    load: Load
    check: Check
    aborts: int | None
    rpcs: dict[str, int]  # Datastore calls by method
    memcache: dict[str, int]  # memcache calls by method
    cpu: dict[str, float | None]  # CPU seconds: client, emulator, memcached
    warnings: dict[str, int] = dataclasses.field(default_factory=dict)  # by log template
    entities: int = 0  # entities the commits wrote (shards, key records, ...)
    shards_in_use: tuple[int, ...] = ()  # each process's shard count at the end (adaptive)
    repeat: int = 0  # which of the run's repeats of every point this is
    cache: str = "memcached"  # the cache kind the run pointed the library at
    ratio_to_blind: float | None = None  # filled in once the blind rate is known
    # Filled in by EngineResults.summarize on the repeat whose rate is the median:
    median: bool = False
    spread: Spread | None = None

    @property
    def writers(self) -> int:
        return self.threads * self.processes

    @property
    def rate(self) -> float:
        return self.load.acked / self.load.elapsed if self.load.elapsed > 0 else 0.0

    @property
    def exact(self) -> bool:
        return self.check.exact and not self.load.errors

    def per_increment(self, calls: dict[str, int]) -> float | None:
        return sum(calls.values()) / self.load.acked if self.load.acked else None

    @property
    def key(self) -> tuple[str, int, int]:
        return self.contender, self.threads, self.processes

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["load"]["latencies"]  # every call's time: too many to keep
        p50, p99 = percentiles(self.load.latencies)
        data.update(
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            writers=self.writers,
            rate=self.rate,
            exact=self.exact,
            aborts_per_increment=(
                self.aborts / self.load.acked
                if self.aborts is not None and self.load.acked
                else None
            ),
            rpcs_per_increment=self.per_increment(self.rpcs),
            memcache_per_increment=self.per_increment(self.memcache),
            entities_per_increment=self.entities / self.load.acked if self.load.acked else None,
        )
        return data


@dataclasses.dataclass(frozen=True)
class Timed:
    """A single-threaded loop: operations done, how long, and how many answered wrong."""

    name: str
    label: str
    operations: int
    elapsed: float
    wrong: int
    cpu: float | None = None  # this process's CPU seconds in the loop
    rpcs_per_op: float | None = None
    memcache_per_op: float | None = None
    detail: str = ""
    round_rates: tuple[float, ...] = ()  # ops/s of each round it took turns in

    @property
    def rate(self) -> float:
        return self.operations / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def exact(self) -> bool:
        return self.wrong == 0

    @property
    def cpu_per_op(self) -> float | None:
        return None if self.cpu is None or not self.operations else self.cpu / self.operations

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "rate": self.rate,
            "cpu_per_op": self.cpu_per_op,
            "exact": self.exact,
        }


@dataclasses.dataclass
class EngineResults:
    """One engine with one cache kind: every point and loop measured there."""

    engine: str
    cache: str = "memcached"
    points: list[Point] = dataclasses.field(default_factory=list)
    not_applicable: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> why
    reads: list[Timed] = dataclasses.field(default_factory=list)
    buffer: list[Timed] = dataclasses.field(default_factory=list)
    fill: list[Timed] = dataclasses.field(default_factory=list)  # BoundedCounter races
    aio: list[Timed] = dataclasses.field(default_factory=list)  # tasks against threads
    seconds: float = 0.0  # wall time of this engine's part

    @property
    def exact(self) -> bool:
        return all(p.exact for p in self.points) and all(t.exact for t in self.timed_loops())

    @property
    def key(self) -> str:
        """Its name in ``BenchOutcome.engines`` and bench.json: the engine on memcached
        (as before Redis was measured), ``engine/redis`` on Redis."""
        return results_key(self.engine, self.cache)

    def timed_loops(self) -> tuple[Timed, ...]:
        return (*self.reads, *self.buffer, *self.fill, *self.aio)

    def point(self, contender: str, threads: int, processes: int = 1) -> Point | None:
        """The median repeat of that point (once summarized; before, the first one)."""
        found = [p for p in self.points if p.key == (contender, threads, processes)]
        return next((p for p in found if p.median), found[0] if found else None)

    def timed(self, name: str) -> Timed | None:
        return next((t for t in self.timed_loops() if t.name == name), None)

    def paired_points(self, contender: str, base: str, threads: int) -> float | None:
        """The median over the run's repeats of ``contender``'s rate over ``base``'s, each
        ratio taken within one repeat (the two measured close together)."""
        rates = {
            (p.contender, p.repeat): p.rate
            for p in self.points
            if p.threads == threads and p.processes == 1
        }
        ratios = [
            rate / rates[(base, repeat)]
            for (name, repeat), rate in rates.items()
            if name == contender and rates.get((base, repeat))
        ]
        return statistics.median(ratios) if ratios else None

    def summarize(self) -> None:
        """Each point's ratio to the blind puts of its own repeat; then, for each point,
        the repeat whose rate is the median stands for it (``point`` returns it), with
        the median of the ratios and the spread of all repeats."""
        blind = {
            (p.threads, p.processes, p.repeat): p for p in self.points if p.contender == "blind"
        }
        for p in self.points:
            base = blind.get((p.threads, p.processes, p.repeat))
            p.ratio_to_blind = p.rate / base.rate if base is not None and base.rate else None
        by_key: dict[tuple[str, int, int], list[Point]] = {}
        for p in self.points:
            by_key.setdefault(p.key, []).append(p)
        for repeats in by_key.values():
            ranked = sorted(repeats, key=lambda p: p.rate)
            middle = ranked[(len(ranked) - 1) // 2]  # the lower median: a run that was made
            ratios = [p.ratio_to_blind for p in repeats if p.ratio_to_blind is not None]
            p50, p99 = percentiles([x for p in repeats for x in p.load.latencies])
            middle.median = True
            middle.ratio_to_blind = statistics.median(ratios) if ratios else None
            middle.spread = Spread(
                repeats=len(repeats),
                rate_min=ranked[0].rate,
                rate_max=ranked[-1].rate,
                ratio_min=min(ratios) if ratios else None,
                ratio_max=max(ratios) if ratios else None,
                latency_p50_ms=p50,
                latency_p99_ms=p99,
            )

    def medians(self) -> list[Point]:
        """One point per contender and concurrency: the median repeat."""
        return [p for p in self.points if p.median]

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "cache": self.cache,
            "seconds": self.seconds,
            "exact": self.exact,
            "not_applicable": self.not_applicable,
            "writers": [p.to_json() for p in self.points],
            "reads": [t.to_json() for t in self.reads],
            "buffer": [t.to_json() for t in self.buffer],
            "fill": [t.to_json() for t in self.fill],
            "aio": [t.to_json() for t in self.aio],
        }


def results_key(engine: str, cache: str) -> str:
    return engine if cache == "memcached" else f"{engine}/{cache}"


def machine() -> dict[str, Any]:
    """Where the numbers were taken: they mean little without it."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        # Other work on the machine skews every rate; this shows how busy it was.
        "load_average_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "packages": {
            name: version(name)
            for name in (
                "sharded-counter",
                "google-cloud-datastore",
                "grpcio",
                "pymemcache",
                "redis",
            )
        },
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def paired_ratio(
    rounds: Sequence[float], base_rounds: Sequence[float], rate: float, base_rate: float
) -> float | None:
    """How fast one loop ran against another that took turns with it: the median of
    the ratios of rounds run back to back, so a burst of load elsewhere on the
    machine that hits one round moves one ratio, not the answer. Without rounds
    (an older bench.json), the ratio of the overall rates."""
    pairs = [a / b for a, b in zip(rounds, base_rounds, strict=False) if b > 0]
    if pairs and len(rounds) == len(base_rounds):
        return statistics.median(pairs)
    return rate / base_rate if base_rate else None


def median_points(engine: Mapping[str, Any]) -> list[Any]:
    """An engine's points in a bench.json, one per contender and concurrency: its median
    repeat (a bench.json from before repeats has one of each, all of them)."""
    return [p for p in engine["writers"] if p.get("median", True)]

"""What one bench run measures, and for how long."""

from __future__ import annotations

import dataclasses
from pathlib import Path

ENGINES = ("classic", "firestore")
# The cache kinds a run measures, each on a server of the run's own: memcached runs
# every contender; Redis the ones its targets name (``contenders.Contender.caches``).
CACHES = ("memcached", "redis")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    engines: tuple[str, ...] = ENGINES
    caches: tuple[str, ...] = CACHES
    threads: tuple[int, ...] = (1, 4, 16, 32)
    # Each of ~70 points on two engines is time-boxed to this, ``repeats`` times; with
    # start-up, checks and the single-threaded loops a default run takes about 15
    # minutes on 2 cores.
    seconds: float = 2.5
    repeats: int = 3  # every point, interleaved: all points once, then all again, ...
    # The multi-process points, as (processes, threads each); () leaves them out.
    layouts: tuple[tuple[int, int], ...] = ((2, 8), (4, 4))
    micro_seconds: float = 1.5  # each single-threaded loop
    warmup_seconds: float = 3.0  # untimed load first: a cold emulator JVM runs ~2x slower
    fill_room: int = 2_000  # increments of each BoundedCounter fill race (bench/fill.py)
    aio_count: int = 4_000  # increments of each tasks-against-threads race (bench/aio.py)
    out: Path = Path("bench-results")
    chart: bool = True

    @classmethod
    def quick(cls, **changes: object) -> BenchOptions:
        """A tiny run for tests: everything once, checked, in seconds."""
        base = cls(
            seconds=0.3,
            micro_seconds=0.2,
            warmup_seconds=0.2,
            threads=(1, 4),
            repeats=2,
            fill_room=200,
            aio_count=200,
            layouts=((2, 8),),
        )
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown or not self.engines:
            raise ValueError(f"engines must be among {', '.join(ENGINES)}, not {unknown}")
        wrong_caches = [c for c in self.caches if c not in CACHES]
        if wrong_caches or not self.caches:
            raise ValueError(f"caches must be among {', '.join(CACHES)}, not {wrong_caches}")
        if not self.threads or min(self.threads) < 1:
            raise ValueError("threads must be one or more positive counts")
        if not self.seconds > 0 or not self.micro_seconds > 0 or self.warmup_seconds < 0:
            raise ValueError("durations must be positive")
        if self.fill_room < 1 or self.aio_count < 1:
            raise ValueError("fill_room and aio_count must be 1 or more")
        if self.repeats < 1:
            raise ValueError("repeats must be 1 or more")
        if any(processes < 2 or threads < 1 for processes, threads in self.layouts):
            raise ValueError("each layout is 2 or more processes of 1 or more threads")

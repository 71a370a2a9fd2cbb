"""``demo`` and ``bench``: races on emulators and memcached that the command starts itself."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ..errors import ShardedCounterError
from .cli_console import backend_errors, fail, stdout

ENGINE_CHOICES: dict[str, tuple[str, ...]] = {"classic": ("classic",), "firestore": ("firestore",)}
ENGINE_CHOICES["both"] = ENGINE_CHOICES["classic"] + ENGINE_CHOICES["firestore"]

# The demo and the bench run on the same emulators, chosen the same way.
_engine_option = click.option(
    "--engine",
    type=click.Choice(sorted(ENGINE_CHOICES)),
    default="both",
    show_default=True,
    help="Which Datastore emulator(s) to run against.",
)


@contextmanager
def _on_own_backends(race: str, missing_package: str) -> Iterator[None]:
    """What stops a race as one line on stderr: exit 2 if the backends could not start, else 1.

    ``missing_package`` is said (exit 2) when the emulator package cannot be imported.
    """
    try:
        from sharded_counter_emulator import BackendError
    except ImportError as exc:
        fail(f"{missing_package}: {exc}", 2)
    failures: tuple[type[BaseException], ...] = (ShardedCounterError, *backend_errors())
    try:
        yield
    except BackendError as exc:
        # MissingDependency among them: its message is the one line to show.
        fail(str(exc), 2)
    except failures as exc:
        fail(f"the {race} failed: {type(exc).__name__}: {exc}".splitlines()[0])


@click.command()
@_engine_option
@click.option(
    "--threads",
    type=click.IntRange(min=1, max=256),
    default=16,
    show_default=True,
    help="Writer threads per contender.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True, max=600),
    default=8.0,
    show_default=True,
    help="How long each contender writes.",
)
@click.option(
    "--shards",
    type=click.IntRange(min=1, max=10_000),
    default=20,
    show_default=True,
    help="Shards of the sharded counter.",
)
def demo(engine: str, threads: int, seconds: float, shards: int) -> None:
    """Race a one-entity counter against a sharded one on the emulators.

    Many threads increment one hot counter kept in a single entity updated in
    a transaction, then a sharded Counter; both totals must come out exact.
    Starts its own emulators and memcached (the Google Cloud SDK emulators and
    memcached must be installed). Exits 1 if any count was not exact, 2 if the
    backends could not be started.
    """
    # Imported when run: no other command needs it, and a test stands in for demo.run.
    from . import demo as demo_module

    missing = "the demo needs the sharded_counter_emulator package, shipped with sharded-counter"
    with _on_own_backends("demo", missing):
        exact = demo_module.run(
            engines=ENGINE_CHOICES[engine],
            threads=threads,
            seconds=seconds,
            shards=shards,
            console=stdout(),
        )
    if not exact:
        raise SystemExit(1)


def _thread_counts(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        counts = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, not {value!r}") from None
    if not counts or not all(1 <= n <= 256 for n in counts):
        raise click.BadParameter("each thread count must be between 1 and 256")
    return tuple(sorted(set(counts)))


@click.command()
@_engine_option
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True, max=600),
    default=None,
    help="Time box of each measurement [default: 2.5, or 0.3 with --quick].",
)
@click.option(
    "--threads",
    callback=_thread_counts,
    default=None,
    metavar="N,N,...",
    help="Writer thread counts [default: 1,4,16,32, or 1,4 with --quick].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="Directory for bench.json and bench.png.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1, max=20),
    default=None,
    help="Runs of every point, interleaved; a point is its median [default: 3, or 2 with --quick].",
)
@click.option(
    "--caches",
    type=click.Choice(["both", "memcached", "redis"]),
    default="both",
    show_default=True,
    help="The cache kinds to measure, each on a server of the run's own.",
)
@click.option("--quick", is_flag=True, help="A tiny run: short time boxes, few thread counts.")
def bench(
    engine: str,
    caches: str,
    seconds: float | None,
    threads: tuple[int, ...] | None,
    out: Path,
    repeats: int | None,
    quick: bool,
) -> None:
    """Race every way of counting side by side, on the emulators, and chart it.

    A one-entity counter, the transaction path with 1, 5, 20 and 50 shards,
    the transform path, the default Counter, the CounterBuffer and blind puts
    (the ceiling), from many threads and from 2 processes; then reads and the
    buffer in one thread. With --caches both (the default) the blind puts, the
    Counter, the keyed Counter, SharedBuffer and the cached read run again with a
    redis-server as the cache. Every point runs --repeats times, interleaved, and
    is reported as its median repeat with the range of the others and the
    p50 and p99 latency per increment. Every total is checked. Writes bench.json and
    bench.png to --out and prints PASS/FAIL per performance target. Exits 1
    if any count was wrong (a missed target does not fail it), 2 if the
    backends could not be started or matplotlib (the bench extra) is missing.
    """
    # Checked first: minutes of measurements should not end without their chart.
    if importlib.util.find_spec("matplotlib") is None:
        fail("the bench draws with matplotlib: pip install 'sharded-counter[bench]'", 2)
    # Imported when run: no other command needs it, and a test stands in for bench.run.
    from .bench import BenchOptions, run

    changes: dict[str, Any] = {"engines": ENGINE_CHOICES[engine], "out": out}
    changes["caches"] = ("memcached", "redis") if caches == "both" else (caches,)
    if seconds is not None:
        changes["seconds"] = seconds
    if threads is not None:
        changes["threads"] = threads
    if repeats is not None:
        changes["repeats"] = repeats
    options = BenchOptions.quick(**changes) if quick else BenchOptions(**changes)
    console = stdout()
    if not console.is_terminal:
        # Piped to a file or a CI log: room for the wide tables rather than 80 columns.
        console = Console(highlight=False, width=160)
    with _on_own_backends("bench", "the bench needs the sharded_counter_emulator package"):
        outcome = run(options, console)
    if not outcome.exact:
        raise SystemExit(1)


COMMANDS = (demo, bench)

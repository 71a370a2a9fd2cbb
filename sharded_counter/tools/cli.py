"""The ``sharded-counter`` command: the demo, and a few commands to poke at real counters.

Every command but ``demo`` talks to whatever the environment points at
(``DATASTORE_EMULATOR_HOST``, ``DATASTORE_DATASET``, ``MEMCACHED_HOSTS``, the
config file), exactly as ``Counter('name')`` in an application would.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import __version__
from ..counter import Counter, Verification
from ..errors import ShardedCounterError
from ..patterns.lock import who_holds
from ..patterns.ratelimit import STRATEGIES, RateLimiter, Strategy
from ..patterns.timeseries import MAX_RETENTION, TimeSeries
from ..settings import (
    CONFIG_ENV,
    DEFAULT_CONFIG_FILE,
    SECTION,
    config,
    config_file_path,
    load_file,
    resolve,
)

F = TypeVar("F", bound=Callable[..., Any])

ENGINE_CHOICES: dict[str, tuple[str, ...]] = {"classic": ("classic",), "firestore": ("firestore",)}
ENGINE_CHOICES["both"] = ENGINE_CHOICES["classic"] + ENGINE_CHOICES["firestore"]

# The variables that decide where a Counter made from the environment connects.
ENVIRONMENT = (
    "DATASTORE_EMULATOR_HOST",
    "DATASTORE_DATASET",
    "DATASTORE_PROJECT_ID",
    "GOOGLE_CLOUD_PROJECT",
    "MEMCACHED_HOSTS",
    CONFIG_ENV,
)

# A negative amount ("increment hits -2") must reach the argument, not the option parser.
_NUMBERS_ALLOWED = {"ignore_unknown_options": True}


def _stdout() -> Console:
    # Made per call so that it writes to whatever sys.stdout is now (CliRunner swaps it).
    return Console(highlight=False)


def _fail(message: str, code: int = 1) -> NoReturn:
    Console(stderr=True, highlight=False).print(message, style="red", markup=False, soft_wrap=True)
    raise SystemExit(code)


def _backend_errors() -> tuple[type[BaseException], ...]:
    """What a misconfigured or unreachable backend raises, besides our own errors."""
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError

    # OSError: the Datastore client says "Project was not passed and could not be
    # determined from the environment" as an EnvironmentError.
    return (GoogleAPIError, GoogleAuthError, OSError)


@contextmanager
def _clean_errors(context: str = "error") -> Iterator[None]:
    """Turn the errors a user can cause or fix into one line on stderr and exit status 1."""
    try:
        yield
    except (TypeError, ValueError, ShardedCounterError) as exc:
        _fail(f"{context}: {exc}")
    except _backend_errors() as exc:
        _fail(f"{context}: {type(exc).__name__}: {exc}".splitlines()[0])


def _shards_option(func: F) -> F:
    return click.option(
        "--shards",
        type=click.IntRange(min=1),
        default=None,
        help="Shards for new increments (default: from the config, else 10).",
    )(func)


def _counter(name: str, shards: int | None) -> Counter:
    options: dict[str, Any] = {} if shards is None else {"shards": shards}
    return Counter(name, **options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
# From the module, not the installed metadata: it also works from a source checkout.
@click.version_option(version=__version__, prog_name="sharded-counter")
def main() -> None:
    """Sharded counters on Google Cloud Datastore with memcache in front."""


# The demo and the bench run on the same emulators, chosen the same way.
_engine_option = click.option(
    "--engine",
    type=click.Choice(sorted(ENGINE_CHOICES)),
    default="both",
    show_default=True,
    help="Which Datastore emulator(s) to run against.",
)


# -- demo ----------------------------------------------------------------------


@main.command()
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
    from . import demo as demo_module

    console = _stdout()
    failures: tuple[type[BaseException], ...] = (ShardedCounterError, *_backend_errors())
    try:
        from sharded_counter_emulator import BackendError
    except ImportError as exc:
        _fail(
            f"the demo needs the sharded_counter_emulator package, shipped with "
            f"sharded-counter: {exc}",
            2,
        )
    try:
        exact = demo_module.run(
            engines=ENGINE_CHOICES[engine],
            threads=threads,
            seconds=seconds,
            shards=shards,
            console=console,
        )
    except BackendError as exc:
        # MissingDependency among them: its message is the one line to show.
        _fail(str(exc), 2)
    except failures as exc:
        _fail(f"the demo failed: {type(exc).__name__}: {exc}".splitlines()[0])
    if not exact:
        raise SystemExit(1)


# -- bench -----------------------------------------------------------------------


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


@main.command()
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
@click.option("--quick", is_flag=True, help="A tiny run: short time boxes, few thread counts.")
def bench(
    engine: str, seconds: float | None, threads: tuple[int, ...] | None, out: Path, quick: bool
) -> None:
    """Race every way of counting side by side, on the emulators, and chart it.

    A one-entity counter, the transaction path with 1, 5, 20 and 50 shards,
    the transform path, the default Counter, the CounterBuffer and blind puts
    (the ceiling), from many threads and from 2 processes; then reads and the
    buffer in one thread. Every total is checked. Writes bench.json and
    bench.png to --out and prints PASS/FAIL per performance target. Exits 1
    if any count was wrong (a missed target does not fail it), 2 if the
    backends could not be started or matplotlib (the bench extra) is missing.
    """
    # Checked first: minutes of measurements should not end without their chart.
    if importlib.util.find_spec("matplotlib") is None:
        _fail("the bench draws with matplotlib: pip install 'sharded-counter[bench]'", 2)
    try:
        from sharded_counter_emulator import BackendError
    except ImportError as exc:
        _fail(f"the bench needs the sharded_counter_emulator package: {exc}", 2)
    from .bench import BenchOptions, run

    changes: dict[str, Any] = {"engines": ENGINE_CHOICES[engine], "out": out}
    if seconds is not None:
        changes["seconds"] = seconds
    if threads is not None:
        changes["threads"] = threads
    options = BenchOptions.quick(**changes) if quick else BenchOptions(**changes)
    console = _stdout()
    if not console.is_terminal:
        # Piped to a file or a CI log: room for the wide tables rather than 80 columns.
        console = Console(highlight=False, width=160)
    failures: tuple[type[BaseException], ...] = (ShardedCounterError, *_backend_errors())
    try:
        outcome = run(options, console)
    except BackendError as exc:
        _fail(str(exc), 2)
    except failures as exc:
        _fail(f"the bench failed: {type(exc).__name__}: {exc}".splitlines()[0])
    if not outcome.exact:
        raise SystemExit(1)


# -- counters ----------------------------------------------------------------------


@main.command()
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@_shards_option
def count(names: tuple[str, ...], shards: int | None) -> None:
    """Show counters' totals: cached, summed from the shards, pending."""
    table = Table(title="counters")
    table.add_column("name", overflow="fold")
    table.add_column("count", justify="right")
    table.add_column("cached", justify="right")
    table.add_column("shard sum", justify="right")
    table.add_column("pending delayed_incr", justify="right")
    with _clean_errors():
        for name in names:
            counter = _counter(name, shards)
            total = counter.count  # fills the cache when it was empty
            report = counter.verify()
            table.add_row(
                Text(name),
                str(total),
                "-" if report.cached is None else str(report.cached),
                str(report.shards),
                str(report.pending) if counter.settings.memcached_hosts else "no memcache",
            )
    _stdout().print(table)


def _verification_table(title: str, reports: list[Verification]) -> Table:
    table = Table(title=title)
    table.add_column("name", overflow="fold")
    table.add_column("cached", justify="right")
    table.add_column("shards + pending", justify="right")
    table.add_column("stale shards", justify="right")
    table.add_column("drift", justify="right")
    table.add_column("ok")
    for report in reports:
        table.add_row(
            Text(report.name),
            "not cached" if report.cached is None else str(report.cached),
            str(report.shards + report.pending),
            str(report.stale_shards),
            f"{report.drift:+d}",
            Text("yes", "green") if report.ok else Text("NO", "bold red"),
        )
    return table


@main.command()
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@_shards_option
def verify(names: tuple[str, ...], shards: int | None) -> None:
    """Compare each cached total with its shards; exit 1 when any has drifted."""
    with _clean_errors():
        reports = [_counter(name, shards).verify() for name in names]
    _stdout().print(_verification_table("verify", reports))
    if not all(r.ok for r in reports):
        raise SystemExit(1)


@main.command()
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@_shards_option
def repair(names: tuple[str, ...], shards: int | None) -> None:
    """Write pending delayed_incr to the shards and rebuild each cached total."""
    with _clean_errors():
        reports = [_counter(name, shards).repair() for name in names]
    _stdout().print(_verification_table("repaired", reports))
    if not all(r.ok for r in reports):
        raise SystemExit(1)


@main.command(context_settings=_NUMBERS_ALLOWED)
@click.argument("name")
@click.argument("n", type=int, default=1, metavar="[N]")
@_shards_option
@click.option(
    "--key",
    default=None,
    help="An idempotency key: the first increment with it counts, any later one counts nothing.",
)
def increment(name: str, n: int, shards: int | None, key: str | None) -> None:
    """Add N (default 1, may be negative) to counter NAME."""
    with _clean_errors():
        counter = _counter(name, shards)
        counter.increment(n, idempotency_key=key)
    # Said apart: a failed read must not pass for a failed write.
    with _clean_errors(f"{name} {n:+d} done, but reading the count back failed"):
        total = counter.count
    _stdout().print(Text.assemble(f"{name} ", (f"{n:+d}", "bold"), f" -> {total}"))


@main.command(name="set", context_settings=_NUMBERS_ALLOWED)
@click.argument("name")
@click.argument("value", type=int)
@_shards_option
def set_(name: str, value: int, shards: int | None) -> None:
    """Set counter NAME to VALUE."""
    with _clean_errors():
        counter = _counter(name, shards)
        counter.set_count(value)
    with _clean_errors(f"{name} set, but reading the count back failed"):
        total = counter.count
    _stdout().print(Text(f"{name} = {total}"))


@main.command()
@click.argument("name")
@_shards_option
def delete(name: str, shards: int | None) -> None:
    """Delete counter NAME, its cached total and pending delayed_incr."""
    with _clean_errors():
        removed = _counter(name, shards).delete()
    _stdout().print(Text(f"deleted {name} ({removed} shard{'' if removed == 1 else 's'})"))


@main.command(name="purge-keys")
def purge_keys() -> None:
    """Delete expired idempotency keys (where no Firestore TTL policy does it)."""
    from ..paths.maintenance import purge_expired_keys

    with _clean_errors():
        removed = purge_expired_keys()
    _stdout().print(Text(f"deleted {removed} expired idempotency key{'' if removed == 1 else 's'}"))


# -- env -------------------------------------------------------------------------


@main.command()
def env() -> None:
    """Show the settings a Counter would get here, and their sources."""
    with _clean_errors():
        path = config_file_path()
        settings = resolve()
        file_options = load_file(path) if path is not None else {}
    console = _stdout()
    table = Table(title="settings")
    table.add_column("option")
    table.add_column("value", overflow="fold")
    table.add_column("from")
    for field in dataclasses.fields(settings):
        table.add_row(
            field.name,
            Text(_show(getattr(settings, field.name))),
            _source(field.name, file_options),
        )
    console.print(table)
    where = Table(show_header=False, title="environment")
    where.add_column("name")
    where.add_column("value", overflow="fold")
    where.add_row("config file", Text(str(path) if path is not None else _no_config_file()))
    for variable in ENVIRONMENT:
        value = os.environ.get(variable)
        where.add_row(variable, Text(value if value is not None else "(not set)"))
    console.print(where)


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, tuple):
        return " ".join(value) if value else "(none)"
    return str(value)


def _source(option: str, file_options: dict[str, Any]) -> str:
    # Mirrors config.resolve's precedence for the sources a CLI process can have.
    if option in config.get(SECTION, {}):
        return "config dict"
    if option == "memcached_hosts" and os.environ.get("MEMCACHED_HOSTS", "").strip():
        return "MEMCACHED_HOSTS"
    if option in file_options:
        return "config file"
    return "default"


def _no_config_file() -> str:
    return f"none (${CONFIG_ENV} is unset and {DEFAULT_CONFIG_FILE} does not exist here)"


# -- the cache tier: rate limits, time series, locks ------------------------------------


@main.command()
@click.argument("key")
@click.option(
    "--limit",
    "limit_text",
    required=True,
    metavar="N/PERIOD",
    help='The limit, e.g. "20/minute", "5/second" or "10 per 30 seconds".',
)
@click.option("--strategy", type=click.Choice(STRATEGIES), default="fixed", show_default=True)
def limits(key: str, limit_text: str, strategy: str) -> None:
    """Show where KEY stands under a rate limit, without spending a hit."""
    with _clean_errors():
        # click has checked the choice; the cast only tells mypy.
        limiter = RateLimiter(limit_text, strategy=cast(Strategy, strategy), on_outage="raise")
        decision = limiter.test(key)
    table = Table(title=f"rate limit {limiter.rate} ({strategy} window)")
    table.add_column("key", overflow="fold")
    table.add_column("remaining", justify="right")
    table.add_column("next hit")
    table.add_column("all free again at (UTC)")
    table.add_column("in", justify="right")
    table.add_row(
        Text(key),
        str(decision.remaining),
        Text("allowed", "green") if decision.allowed else Text("refused", "bold red"),
        _utc(decision.reset_at),
        f"{max(0.0, decision.reset_at - time.time()):.1f} s",
    )
    _stdout().print(table)


def _instant(_ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        return parse_when(value, time.time())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


@main.command()
@click.argument("key")
@click.option("--series", "series_name", required=True, help="The TimeSeries name (name_prefix).")
@click.option(
    "--start",
    callback=_instant,
    default="-1h",
    show_default=True,
    help="Unix seconds, ISO 8601 (UTC unless it says), 'now', or relative like -15m.",
)
@click.option("--end", callback=_instant, default="now", show_default=True, help="As --start.")
@click.option(
    "--resolution", type=click.IntRange(min=1), required=True, help="Bucket length in seconds."
)
@click.option(
    "--durable", is_flag=True, help="Add the buckets rolled up into Counters (needs Datastore)."
)
def series(
    key: str, series_name: str, start: float, end: float, resolution: int, durable: bool
) -> None:
    """Show KEY's counts per bucket of a time series between --start and --end."""
    with _clean_errors():
        # The longest retention: the command shows whatever memcache still holds.
        ts = TimeSeries(series_name, [(resolution, MAX_RETENTION)], durable=durable)
        rows = ts.series(key, start, end, resolution)
    table = Table(title=f"{series_name} / {key}: buckets of {resolution} s")
    table.add_column("bucket start (UTC)")
    table.add_column("count", justify="right")
    for bucket, count in rows:
        table.add_row(_utc(bucket), str(count))
    table.add_section()
    table.add_row("total", str(sum(count for _, count in rows)))
    _stdout().print(table)


@main.command(name="lock-status")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
def lock_status(names: tuple[str, ...]) -> None:
    """Show who holds each lock and for how long at most."""
    table = Table(title="locks")
    table.add_column("lock", overflow="fold")
    table.add_column("state")
    table.add_column("holder", overflow="fold")
    table.add_column("taken at (UTC)")
    table.add_column("lapses in", justify="right")
    with _clean_errors():
        holders = [(name, who_holds(name)) for name in names]
    for name, holder in holders:
        if holder is None:
            table.add_row(Text(name), Text("free", "green"), "-", "-", "-")
        else:
            table.add_row(
                Text(name),
                Text("held", "bold yellow"),
                Text(holder.owner),
                _utc(holder.acquired_at),
                f"{holder.ttl():.1f} s",
            )
    _stdout().print(table)


_RELATIVE = re.compile(r"(?:now)?\s*([+-])\s*([0-9]{1,9})\s*([smhd])", re.ASCII | re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_LAST_SECOND = 253402300799.0  # 9999-12-31T23:59:59Z


def parse_when(text: str, now: float) -> float:
    """A time on the command line as unix seconds.

    ``now``; relative to now (``-15m``, ``+2h``, ``now-1d``); unix seconds
    (``1700000000.5``); or ISO 8601 (``2024-05-01T12:00:00``, taken as UTC
    unless it carries an offset). Anything else raises ``ValueError``.
    """
    when = _parse_when(text.strip(), now)
    if not 0 <= when <= _LAST_SECOND:
        raise ValueError(f"{text!r} is outside 1970-01-01 to 9999-12-31")
    return when


def _parse_when(spec: str, now: float) -> float:
    if spec.lower() == "now":
        return now
    relative = _RELATIVE.fullmatch(spec)
    if relative is not None:
        sign, amount, unit = relative.groups()
        offset = int(amount) * _UNIT_SECONDS[unit.lower()]
        return now + offset if sign == "+" else now - offset
    if re.fullmatch(r"[0-9]{1,12}(?:\.[0-9]{1,9})?", spec, re.ASCII):
        return float(spec)
    # Python 3.10's fromisoformat does not read the "Z" suffix yet.
    iso = spec[:-1] + "+00:00" if spec[-1:] in ("Z", "z") else spec
    try:
        parsed = dt.datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"{spec!r} is not a time: use unix seconds, ISO 8601, 'now', or e.g. -15m"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    try:
        return parsed.timestamp()
    except (OverflowError, ValueError):
        raise ValueError(f"{spec!r} is outside 1970-01-01 to 9999-12-31") from None


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

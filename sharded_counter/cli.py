"""The ``sharded-counter`` command: the demo, and a few commands to poke at real counters.

Every command but ``demo`` talks to whatever the environment points at
(``DATASTORE_EMULATOR_HOST``, ``DATASTORE_DATASET``, ``MEMCACHED_HOSTS``, the
config file), exactly as ``Counter('name')`` in an application would.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_FILE,
    SECTION,
    config,
    config_file_path,
    load_file,
    resolve,
)
from .counter import Counter, Verification
from .errors import ShardedCounterError

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


# -- demo ----------------------------------------------------------------------


@main.command()
@click.option(
    "--engine",
    type=click.Choice(sorted(ENGINE_CHOICES)),
    default="both",
    show_default=True,
    help="Which Datastore emulator to run against.",
)
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
def increment(name: str, n: int, shards: int | None) -> None:
    """Add N (default 1, may be negative) to counter NAME."""
    with _clean_errors():
        counter = _counter(name, shards)
        counter.increment(n)
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

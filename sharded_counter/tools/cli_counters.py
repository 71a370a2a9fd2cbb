"""The commands on counters: count, verify, repair, increment, set, delete, purge-keys, flush.

Each acts on whatever the environment points at (``DATASTORE_EMULATOR_HOST``,
``DATASTORE_DATASET``, ``MEMCACHED_HOSTS``, the config file), exactly as
``Counter('name')`` in an application would.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.table import Table
from rich.text import Text

from ..counter import Counter, Verification
from ..errors import CacheUnavailable
from .cli_console import clean_errors, stdout

if TYPE_CHECKING:
    from ..patterns.shared_buffer import FlushRound

F = TypeVar("F", bound=Callable[..., Any])

_SIGNAL_CHECK = 0.1  # seconds: how soon a flusher sleeping between rounds sees SIGTERM

# A negative amount ("increment hits -2") must reach the argument, not the option parser.
_NUMBERS_ALLOWED = {"ignore_unknown_options": True}

_names_argument = click.argument("names", metavar="NAME...", nargs=-1, required=True)


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


@click.command()
@_names_argument
@_shards_option
def count(names: tuple[str, ...], shards: int | None) -> None:
    """Show counters' totals: cached, summed from the shards, pending."""
    table = Table(title="counters")
    table.add_column("name", overflow="fold")
    table.add_column("count", justify="right")
    table.add_column("cached", justify="right")
    table.add_column("shard sum", justify="right")
    table.add_column("pending delayed_incr", justify="right")
    cache_down = False
    with clean_errors():
        for name in names:
            counter = _counter(name, shards)
            total = counter.count  # fills the cache when it was empty
            try:
                report = counter.verify()
            except CacheUnavailable:
                # The library reads the shards when the cache is down; so does this.
                cache_down = True
                table.add_row(Text(name), str(total), "cache down", str(total), "unknown")
                continue
            table.add_row(
                Text(name),
                str(total),
                "-" if report.cached is None else str(report.cached),
                str(report.shards),
                str(report.pending) if _has_cache(counter) else "no cache",
            )
    stdout().print(table)
    if cache_down:
        click.echo(
            "the cache is unavailable: counts are the shards' sums, without what may be "
            "pending in the cache",
            err=True,
        )


def _has_cache(counter: Counter) -> bool:
    """Whether ``counter`` has a cache (memcached or Redis) to hold a pending stash."""
    settings = counter.settings
    return bool(settings.memcached_hosts or settings.cache_url)


@click.command()
@_names_argument
@_shards_option
def verify(names: tuple[str, ...], shards: int | None) -> None:
    """Compare each cached total with its shards; exit 1 when any has drifted."""
    _check_each("verify", names, shards, Counter.verify)


@click.command()
@_names_argument
@_shards_option
def repair(names: tuple[str, ...], shards: int | None) -> None:
    """Write pending delayed_incr to the shards and rebuild each cached total."""
    _check_each("repaired", names, shards, Counter.repair)


def _check_each(
    title: str,
    names: tuple[str, ...],
    shards: int | None,
    check: Callable[[Counter], Verification],
) -> None:
    """Run ``check`` on each counter, show the reports; exit 1 when any is not ok."""
    with clean_errors():
        reports = [check(_counter(name, shards)) for name in names]
    stdout().print(_verification_table(title, reports))
    if not all(r.ok for r in reports):
        raise SystemExit(1)


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


@click.command(context_settings=_NUMBERS_ALLOWED)
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
    with clean_errors():
        counter = _counter(name, shards)
        counter.increment(n, idempotency_key=key)
    # Said apart: a failed read must not pass for a failed write.
    with clean_errors(f"{name} {n:+d} done, but reading the count back failed"):
        total = counter.count
    stdout().print(Text.assemble(f"{name} ", (f"{n:+d}", "bold"), f" -> {total}"))


@click.command(name="set", context_settings=_NUMBERS_ALLOWED)
@click.argument("name")
@click.argument("value", type=int)
@_shards_option
def set_(name: str, value: int, shards: int | None) -> None:
    """Set counter NAME to VALUE."""
    with clean_errors():
        counter = _counter(name, shards)
        counter.set_count(value)
    with clean_errors(f"{name} set, but reading the count back failed"):
        total = counter.count
    stdout().print(Text(f"{name} = {total}"))


@click.command()
@click.argument("name")
@_shards_option
def delete(name: str, shards: int | None) -> None:
    """Delete counter NAME, its cached total and pending delayed_incr."""
    with clean_errors():
        removed = _counter(name, shards).delete()
    stdout().print(Text(f"deleted {name} ({removed} shard{'' if removed == 1 else 's'})"))


@click.command(name="purge-keys")
def purge_keys() -> None:
    """Delete expired idempotency keys (where no Firestore TTL policy does it)."""
    from ..paths.maintenance import purge_expired_keys

    with clean_errors():
        removed = purge_expired_keys()
    stdout().print(Text(f"deleted {removed} expired idempotency key{'' if removed == 1 else 's'}"))


def _seconds_between_rounds(
    ctx: click.Context, param: click.Parameter, value: float | None
) -> float | None:
    # time.sleep and threading waits refuse what is not finite, negative or past
    # TIMEOUT_MAX: refused here as a usage error, not hours later as a crash.
    if value is None:
        return None
    if not (math.isfinite(value) and 0 < value <= threading.TIMEOUT_MAX):
        raise click.BadParameter(
            f"{value} is not a number of seconds above 0 and at most {threading.TIMEOUT_MAX:g}"
        )
    return value


@click.command()
@click.argument("names", metavar="[NAME...]", nargs=-1)
@click.option(
    "--every",
    type=float,
    callback=_seconds_between_rounds,
    default=None,
    metavar="SECONDS",
    help="Keep flushing, once per this many seconds, until SIGTERM or SIGINT.",
)
def flush(names: tuple[str, ...], every: float | None) -> None:
    """Write what SharedBuffer increments left pending in memcache.

    Every listed counter (or the NAMEs given) gets one shard write; counters
    another flusher is writing are left to it. For a cron job, or, with
    --every, a worker: it outlives failed rounds (waiting longer after each,
    up to a minute), and on SIGTERM or SIGINT it finishes its round, releases
    its locks and exits 0.
    """
    from ..patterns.shared_buffer import FlushBackoff, SharedBuffer

    with clean_errors():
        buffer = SharedBuffer(interval=every or 5.0)
    backoff = FlushBackoff(buffer.interval)
    with _StopSignals() as stop:
        while True:
            outcome = buffer.flush_round(list(names) if names else None)
            written = len(outcome.written)
            stdout().print(Text(f"flushed {written} counter{'' if written == 1 else 's'}"))
            if every is None:
                _fail_on(outcome)
                return
            delay = backoff.after(outcome)
            _report_failures(outcome, delay)
            stop.sleep(0 if stop.received else delay)
            if stop.received:
                click.echo(f"{stop.received.name}: round finished, locks released", err=True)
                return


def _fail_on(outcome: FlushRound) -> None:
    """A single flush exits as any other command: 1, with one line per failure."""
    error = outcome.first_error()
    if error is None:
        return
    for name, exc in outcome.failed.items():
        click.echo(f"flush of {name!r} failed: {_one_line(exc)}", err=True)
    with clean_errors("flush failed"):
        raise error


def _report_failures(outcome: FlushRound, delay: float) -> None:
    if outcome.listing_error is not None:
        click.echo(
            f"could not take the pending counters: {_one_line(outcome.listing_error)}", err=True
        )
    for name, exc in outcome.failed.items():
        click.echo(f"flush of {name!r} failed: {_one_line(exc)}", err=True)
    if outcome.transient:
        click.echo(f"next round in {delay:.1f} s", err=True)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


class _StopSignals:
    """SIGTERM and SIGINT, while inside: noted, not acted on at once, so that a round
    of writes ends as usual (its locks released) before the command exits."""

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # else: cannot catch them
            for signum in self._SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or until a signal came."""
        deadline = time.monotonic() + seconds
        while self.received is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _SIGNAL_CHECK))


COMMANDS = (count, verify, repair, increment, set_, delete, purge_keys, flush)

"""The commands on the cache tier's patterns: ``limits``, ``series`` and ``lock-status``.

They read what memcache holds (and, for ``series --durable``, Datastore)
without changing it: no hit is spent, no lock is taken.
"""

from __future__ import annotations

import time
from typing import cast

import click
from rich.table import Table
from rich.text import Text

from ..patterns.lock import who_holds
from ..patterns.ratelimit import STRATEGIES, RateLimiter, Strategy
from ..patterns.timeseries import MAX_RETENTION, TimeSeries
from .cli_console import clean_errors, stdout
from .cli_time import parse_when, utc


@click.command()
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
    with clean_errors():
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
        utc(decision.reset_at),
        f"{max(0.0, decision.reset_at - time.time()):.1f} s",
    )
    stdout().print(table)


def _instant(_ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        return parse_when(value, time.time())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


@click.command()
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
    with clean_errors():
        # The longest retention: the command shows whatever memcache still holds.
        ts = TimeSeries(series_name, [(resolution, MAX_RETENTION)], durable=durable)
        rows = ts.series(key, start, end, resolution)
    table = Table(title=f"{series_name} / {key}: buckets of {resolution} s")
    table.add_column("bucket start (UTC)")
    table.add_column("count", justify="right")
    for bucket, count in rows:
        table.add_row(utc(bucket), str(count))
    table.add_section()
    table.add_row("total", str(sum(count for _, count in rows)))
    stdout().print(table)


@click.command(name="lock-status")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
def lock_status(names: tuple[str, ...]) -> None:
    """Show who holds each lock and for how long at most."""
    table = Table(title="locks")
    table.add_column("lock", overflow="fold")
    table.add_column("state")
    table.add_column("holder", overflow="fold")
    table.add_column("taken at (UTC)")
    table.add_column("lapses in", justify="right")
    with clean_errors():
        holders = [(name, who_holds(name)) for name in names]
    for name, holder in holders:
        if holder is None:
            table.add_row(Text(name), Text("free", "green"), "-", "-", "-")
        else:
            table.add_row(
                Text(name),
                Text("held", "bold yellow"),
                Text(holder.owner),
                utc(holder.acquired_at),
                f"{holder.ttl():.1f} s",
            )
    stdout().print(table)


COMMANDS = (limits, series, lock_status)

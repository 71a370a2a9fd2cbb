"""``bounded NAME``: a bounded counter's total, bounds and each shard's room; and new bounds.

It reads the bounds Datastore holds (a bounded counter is laid out by its
first use in an application, or here by ``--max`` / ``--min``), so it needs
no bounds on its command line to show one.
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table
from rich.text import Text

from ..bounded import BoundedCounter
from .cli_console import clean_errors, fail, stdout

_NUMBERS_ALLOWED = {"ignore_unknown_options": True}


def _bound(value: int | None) -> str:
    return "none" if value is None else str(value)


@click.command(context_settings=_NUMBERS_ALLOWED)
@click.argument("name")
@click.option("--max", "maximum", type=int, default=None, help="Set this maximum.")
@click.option("--min", "minimum", type=int, default=None, help="Set this minimum.")
@click.option("--no-max", is_flag=True, help="Remove the maximum.")
@click.option("--no-min", is_flag=True, help="Remove the minimum.")
@click.option(
    "--shards", type=click.IntRange(1, 400), default=None, help="Change the shard count too."
)
def bounded(
    name: str,
    maximum: int | None,
    minimum: int | None,
    no_max: bool,
    no_min: bool,
    shards: int | None,
) -> None:
    """Show bounded counter NAME (total, bounds, each shard's room), or change its bounds.

    With --max/--min/--no-max/--no-min/--shards the bounds change in one
    transaction that keeps the total (exit 1, nothing written, when the total
    is outside the new bounds); a plain counter's name becomes bounded.
    """
    if (maximum is not None and no_max) or (minimum is not None and no_min):
        fail("give a bound or remove it, not both", 2)
    changing = maximum is not None or minimum is not None or no_max or no_min or shards
    with clean_errors():
        stored = BoundedCounter(name).bounds_in_datastore()
        if stored is None and not changing:
            fail(f"{name!r} is not a bounded counter (give --max or --min to make it one)", 1)
        options: dict[str, Any] = {}
        if stored is not None:
            old, options["shards"] = stored
            options.update(minimum=old.minimum, maximum=old.maximum)
        counter = BoundedCounter(name, **options)
        if changing:
            counter.set_bounds(
                None if no_min else (minimum if minimum is not None else counter.minimum),
                None if no_max else (maximum if maximum is not None else counter.maximum),
                shards=shards,
            )
        shares = counter.shares()
        total = counter.get_count(nocache=True)
    # A Text, not markup: "[0, 20]" would read as a style tag.
    bounds = f"[{_bound(counter.minimum)}, {_bound(counter.maximum)}]"
    table = Table(title=Text(f"{name}: {total} in {bounds}"))
    table.add_column("shard", justify="right")
    table.add_column("count", justify="right")
    table.add_column("room up", justify="right")
    table.add_column("room down", justify="right")
    for index, count, room_up, room_down in shares:
        table.add_row(str(index), str(count), _bound(room_up), _bound(room_down))
    ups = [u for _, _, u, _ in shares if u is not None]
    downs = [d for _, _, _, d in shares if d is not None]
    table.add_row(
        Text("all", "bold"),
        Text(str(sum(c for _, c, _, _ in shares)), "bold"),
        Text(str(sum(ups)) if ups else "none", "bold"),
        Text(str(sum(downs)) if downs else "none", "bold"),
    )
    stdout().print(table)


COMMANDS = (bounded,)

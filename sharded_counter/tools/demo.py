"""The demo: many threads hammer one hot counter, written two ways, on each emulator.

The naive App Engine counter is one entity updated in a transaction: every
writer contends for the same entity, so most attempts abort (optimistic
engine) or queue for its lock (Firestore in Datastore mode). A sharded
Counter spreads the same writes over many entities. Both must end exact: the
total read back equals the increments that were acknowledged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from google.cloud import datastore
from google.cloud.datastore.query import PropertyFilter
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from ..core.keys import SHARD_KIND, shard_index
from ..counter import Counter
from .tally import WriterTally
from .warning_tally import tally_warnings

ENGINE_TITLES = {
    "classic": "Datastore emulator (classic, optimistic transactions)",
    "firestore": "Firestore emulator in Datastore mode (pessimistic locks, transforms)",
}

ONE_ENTITY = "one entity, transaction"
SHARDED = "sharded Counter"

# How often the progress bars are redrawn while the writers run.
_REFRESH = 0.1


@contextlib.contextmanager
def _warnings_shown_after(console: Console) -> Iterator[None]:
    """The library's warnings during a race, each kind printed once when it is over."""
    with tally_warnings() as tally:
        yield
    for template, n in tally.counts.most_common():
        console.print(Text(f"library warning, {n:,} x: {tally.examples[template]}", style="yellow"))


@dataclasses.dataclass
class Outcome:
    """What one contender did, and what the counter said afterwards."""

    contender: str
    counter_name: str
    write_mode: str
    increments: int
    expected: int
    elapsed: float
    aborts: int
    not_recorded: int
    errors: dict[str, int]
    uncached: int
    cached: int

    @property
    def exact(self) -> bool:
        return self.uncached == self.expected and self.cached == self.expected

    @property
    def rate(self) -> float:
        return self.increments / self.elapsed if self.elapsed > 0 else 0.0


def run(
    engines: Sequence[str],
    threads: int,
    seconds: float,
    shards: int,
    console: Console,
) -> bool:
    """Run the race on each engine in ``engines``; True when every count was exact.

    Starts (and stops) its own emulators and memcached. Raises the emulator
    package's ``MissingDependency`` when one of them is not installed.
    """
    # Imported here: only the demo needs the emulators, the rest of the CLI does not.
    from sharded_counter_emulator import BackendStack

    engines = tuple(dict.fromkeys(engines))
    unknown = [e for e in engines if e not in ENGINE_TITLES]
    if unknown or not engines:
        raise ValueError(f"engines must be among {', '.join(ENGINE_TITLES)}, not {unknown}")
    if threads < 1 or not seconds > 0 or shards < 1:
        raise ValueError("threads, seconds and shards must be positive")

    exact = True
    started = time.monotonic()
    with contextlib.ExitStack() as stack_scope:
        with console.status(f"starting {', '.join(engines)} emulator(s) and memcached..."):
            stack = stack_scope.enter_context(BackendStack(engines=engines, memcached=1))
        console.print(f"backends up in {time.monotonic() - started:.1f}s")
        for engine in engines:
            with stack.activated(engine):
                exact &= _race(engine, threads, seconds, shards, console)
    console.print(
        Text("every count was exact", style="bold green")
        if exact
        else Text("some count was NOT exact", style="bold red")
    )
    console.print(f"demo took {time.monotonic() - started:.1f}s")
    return exact


def _race(engine: str, threads: int, seconds: float, shards: int, console: Console) -> bool:
    console.rule(ENGINE_TITLES[engine])
    tag = uuid.uuid4().hex[:8]
    # A writer still retrying when time is up holds the demo back: bound it.
    limits: dict[str, Any] = {"retry_deadline": min(seconds, 10.0)}
    contenders = [
        (
            ONE_ENTITY,
            Counter(
                f"demo-one-{engine}-{tag}",
                shards=1,
                max_shards=1,  # the one entity, as written
                write_mode="transaction",
                memcached_hosts=(),
                # The pattern as the originals wrote it: one write per increment,
                # no group commit (more writes in flight than threads).
                max_concurrent_writes=max(threads, 1),
                group_commit=False,
                **limits,
            ),
        ),
        (SHARDED, Counter(f"demo-sharded-{engine}-{tag}", shards=shards, **limits)),
    ]
    outcomes: list[Outcome] = []
    with (
        _warnings_shown_after(console),
        Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[done]:>9,} increments"),
            TextColumn("{task.fields[rate]:>9,.1f}/s"),
            TextColumn("{task.fields[left]}"),
            console=console,
        ) as progress,
    ):
        for label, counter in contenders:
            outcomes.append(_contend(label, counter, threads, seconds, progress))
    console.print(_results_table(engine, threads, outcomes))
    for outcome in outcomes:
        for note in _notes(outcome):
            console.print(note)
    sharded = contenders[-1][1]
    console.print(_distribution_table(sharded.name, shards))
    return all(o.exact for o in outcomes)


def _contend(
    label: str, counter: Counter, threads: int, seconds: float, progress: Progress
) -> Outcome:
    tallies = [WriterTally() for _ in range(threads)]
    stop = threading.Event()
    task = progress.add_task(label, total=seconds, done=0, rate=0.0, left="")
    start = time.monotonic()
    deadline = start + seconds
    writers = [
        threading.Thread(
            target=tally.write_until,
            args=(counter.increment, deadline),
            kwargs={"stop": stop},
            name=f"{label}-{i}",
            daemon=True,
        )
        for i, tally in enumerate(tallies)
    ]
    for writer in writers:
        writer.start()
    try:
        while any(w.is_alive() for w in writers):
            _show_progress(progress, task, tallies, start, deadline)
            time.sleep(_REFRESH)
    finally:
        stop.set()
    elapsed = time.monotonic() - start
    _show_progress(progress, task, tallies, start, deadline, elapsed=elapsed)

    total = WriterTally.total(tallies)
    return Outcome(
        contender=label,
        counter_name=counter.name,
        write_mode=counter.write_mode,
        increments=total.acked,
        expected=total.expected,
        elapsed=elapsed,
        aborts=counter.stats.snapshot()["aborts"],
        not_recorded=total.not_recorded,
        errors=dict(total.errors),
        uncached=counter.get_count(nocache=True),
        cached=counter.count,
    )


def _show_progress(
    progress: Progress,
    task: TaskID,
    tallies: Sequence[WriterTally],
    start: float,
    deadline: float,
    elapsed: float | None = None,
) -> None:
    now = time.monotonic()
    running = now - start if elapsed is None else elapsed
    done = sum(t.acked for t in tallies)
    if elapsed is not None:
        left = f"done in {elapsed:.1f}s"
    elif now < deadline:
        left = f"{deadline - now:4.1f}s left"
    else:
        left = "finishing calls in flight"
    progress.update(
        task,
        completed=min(running, deadline - start),
        done=done,
        rate=done / running if running > 0 else 0.0,
        left=left,
    )


def _results_table(engine: str, threads: int, outcomes: Sequence[Outcome]) -> Table:
    table = Table(
        title=f"{engine}: {threads} threads on one hot counter",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("contender", no_wrap=True)
    table.add_column("write path", no_wrap=True)
    table.add_column("incr.", justify="right", no_wrap=True)
    table.add_column("incr./s", justify="right", no_wrap=True)
    table.add_column("aborts", justify="right", no_wrap=True)
    table.add_column("aborts/inc", justify="right", no_wrap=True)
    table.add_column("exact", justify="center", no_wrap=True)
    for o in outcomes:
        table.add_row(
            o.contender,
            o.write_mode,
            f"{o.increments:,}",
            f"{o.rate:,.1f}",
            f"{o.aborts:,}",
            f"{o.aborts / o.increments:.2f}" if o.increments else "-",
            Text("yes", style="green") if o.exact else Text("NO", style="bold red"),
        )
    by_label = {o.contender: o for o in outcomes}
    one, sharded = by_label.get(ONE_ENTITY), by_label.get(SHARDED)
    if one is not None and sharded is not None:
        ratio = _times(sharded.rate / one.rate) if one.rate > 0 else "n/a"
        table.add_section()
        table.add_row("sharded / one entity", "", "", Text(ratio, style="bold"))
    return table


def _notes(outcome: Outcome) -> Iterator[Text]:
    """What the table has no room for: lost increments, errors, and why a count is off."""
    if outcome.not_recorded:
        yield Text(
            f"{outcome.contender}: {_plural(outcome.not_recorded, 'increment')} gave up "
            "(refused, nothing stored), so not expected"
        )
    if outcome.errors:
        seen = ", ".join(f"{n:,} x {kind}" for kind, n in sorted(outcome.errors.items()))
        yield Text(f"{outcome.contender}: other errors seen by the writers: {seen}")
    if not outcome.exact:
        yield Text(
            f"{outcome.contender}: expected {outcome.expected:,}, but get_count(nocache=True) "
            f"says {outcome.uncached:,} and the cached count {outcome.cached:,}",
            style="red",
        )


def _distribution_table(name: str, shards: int) -> Table:
    """How the sharded counter's total is spread, read straight from Datastore."""
    client = datastore.Client()  # type: ignore[no-untyped-call]
    query = client.query(kind=SHARD_KIND)  # type: ignore[no-untyped-call]
    query.add_filter(filter=PropertyFilter("name", "=", name))  # type: ignore[no-untyped-call]
    rows: list[tuple[int, str, int]] = []
    for entity in query.fetch():
        key_name = str(entity.key.name)
        index = shard_index(name, key_name)
        rows.append((index if index is not None else -1, key_name, int(entity.get("count", 0))))
    rows.sort()
    total = sum(count for _, _, count in rows)
    table = Table(
        title=f"{name}: {len(rows)} of {shards} shards written",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    table.add_column("shard", justify="right")
    table.add_column("key name")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for index, key_name, count in rows:
        share = f"{100 * count / total:.1f}%" if total else "-"
        table.add_row(str(index), Text(key_name), f"{count:,}", share)
    table.add_section()
    table.add_row("", "total", f"{total:,}", "")
    return table


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _times(ratio: float) -> str:
    return f"x {ratio:,.0f}" if ratio >= 100 else f"x {ratio:.1f}"

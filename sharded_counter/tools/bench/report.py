"""Tables for the terminal (rich), Markdown for docs/benchmarks.md, and the JSON file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .contenders import CONTENDERS
from .results import EngineResults, Point, paired_ratio
from .targets import TargetResult

ENGINE_TITLES = {
    "classic": "classic Datastore emulator",
    "firestore": "Firestore emulator in Datastore mode",
}


def title(engine: str, cache: str = "memcached") -> str:
    """An engine's title, with the cache kind it ran with."""
    return f"{ENGINE_TITLES.get(engine, engine)}, {cache}"


def _rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:,.1f}"


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.2f}x"


def _per(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cores(point: Point, who: str) -> str:
    used = point.cpu.get(who)
    return "-" if used is None or point.load.elapsed <= 0 else f"{used / point.load.elapsed:.2f}"


def _micros(point: Point, who: str) -> str:
    used = point.cpu.get(who)
    return "-" if used is None or not point.load.acked else f"{1e6 * used / point.load.acked:,.1f}"


def _concurrency(point: Point) -> str:
    if point.processes == 1:
        return str(point.threads)
    return f"{point.processes}x{point.threads}"


def _exact(ok: bool) -> Text:
    return Text("yes", style="green") if ok else Text("NO", style="bold red")


def writers_table(results: EngineResults) -> Table:
    table = Table(
        title=f"{title(results.engine, results.cache)}: writers",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for header in (
        "contender",
        "writers",
        "incr./s",
        "range",
        "vs blind",
        "p50 ms",
        "p99 ms",
        "aborts/inc",
        "RPCs/inc",
        "ents/inc",
        "mc/inc",
        "client cores",
        "client µs/inc",
        "emu. cores",
        "exact",
    ):
        table.add_column(header, justify="left" if header == "contender" else "right", no_wrap=True)
    last = ""
    for point in sorted(results.medians(), key=_order):
        if last and point.contender != last:
            table.add_section()
        acked = point.load.acked
        spread = point.spread
        table.add_row(
            point.label if point.contender != last else "",
            _concurrency(point),
            _rate(point.rate),
            "-" if spread is None else f"{_rate(spread.rate_min)}-{_rate(spread.rate_max)}",
            _ratio(point.ratio_to_blind),
            _millis(None if spread is None else spread.latency_p50_ms),
            _millis(None if spread is None else spread.latency_p99_ms),
            _per(point.aborts / acked if point.aborts is not None and acked else None),
            _per(point.per_increment(point.rpcs)),
            _per(point.entities / acked if acked else None),
            _per(point.per_increment(point.memcache)),
            _cores(point, "client"),
            _micros(point, "client"),
            _cores(point, "emulator"),
            _exact(point.exact),
        )
        last = point.contender
    repeats = max((p.spread.repeats for p in results.medians() if p.spread), default=1)
    notes = [
        f"each point: the median of {repeats} interleaved repeats (range: their lowest and "
        "highest rate); vs blind: the median of each repeat's ratio to the blind puts' at "
        "the same writers; p50/p99: latency per increment over all repeats",
        "ents: entities written; "
        "mc: memcache calls; "
        "cores: CPU seconds per second of wall time (all cores together)",
        *(f"{key}: n/a, {why}" for key, why in results.not_applicable.items()),
    ]
    table.caption = "\n".join(notes)
    return table


def _order(point: Point) -> tuple[int, int, int]:
    """Contenders in their listed order, threads rising, the multi-process point last."""
    rank = next((i for i, c in enumerate(CONTENDERS) if c.key == point.contender), len(CONTENDERS))
    return rank, point.processes, point.threads


def calls_table(results: EngineResults, threads: int) -> Table:
    """Round trips per increment, method by method, at one concurrency."""
    table = Table(
        title=f"{results.key}: calls per increment at {threads} writer threads",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("contender", no_wrap=True)
    table.add_column("Datastore", no_wrap=True)
    table.add_column("memcache", no_wrap=True)
    for point in sorted(results.medians(), key=_order):
        if point.threads != threads or point.processes != 1 or not point.load.acked:
            continue
        table.add_row(
            point.label,
            _breakdown(point.rpcs, point.load.acked),
            _breakdown(point.memcache, point.load.acked),
        )
    return table


def _millis(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _breakdown(calls: dict[str, int], per: int) -> str:
    return ", ".join(f"{method} {n / per:.2f}" for method, n in calls.items() if n) or "-"


def micro_table(results: EngineResults) -> Table:
    loops = (
        "one thread (reads, buffer); 16 threads (a bounded fill); 64 tasks against 16 threads"
        if results.buffer or results.fill or results.aio
        else "reads, one thread"
    )
    table = Table(
        title=f"{results.key}: {loops}",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for header in ("operation", "ops/s", "ratio", "client µs/op", "calls per op", "exact"):
        table.add_column(
            header, justify="left" if header in ("operation", "calls per op") else "right"
        )
    bare = results.timed("read-bare-get")
    locked = results.timed("dict-under-lock")
    far = results.timed("bounded-fill-far")
    threads = results.timed("counter-threads-16")
    for timed, base in (
        *((t, bare) for t in results.reads),
        *((t, locked) for t in results.buffer),
        *((t, far) for t in results.fill),
        *((t, threads) for t in results.aio),
    ):
        ratio = (
            None
            if base is None
            else paired_ratio(timed.round_rates, base.round_rates, timed.rate, base.rate)
        )
        cpu = timed.cpu_per_op
        table.add_row(
            timed.label,
            _rate(timed.rate),
            _ratio(ratio),
            "-" if cpu is None else f"{1e6 * cpu:,.2f}",
            timed.detail,
            _exact(timed.exact),
        )
    return table


def targets_table(targets: Sequence[TargetResult]) -> Table:
    table = Table(title="targets", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in ("engine", "target", "measured", "needed", "verdict"):
        table.add_column(header, justify="right" if header in ("measured", "needed") else "left")
    for target in targets:
        style = {True: "green", False: "bold red", None: "yellow"}[target.passed]
        table.add_row(
            target.engine,
            target.target,
            _target_value(target.measured, target.unit),
            ("<= " if target.at_most else ">= ") + _target_value(target.threshold, target.unit),
            Text(target.verdict, style=style),
        )
    return table


def _target_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if unit == "x" else f"{value:,.0f}{unit}"


def print_engine(console: Console, results: EngineResults, calls_at: int | None) -> None:
    console.print(writers_table(results))
    if calls_at is not None:
        console.print(calls_table(results, calls_at))
    console.print(micro_table(results))
    for point in results.points:
        for line, wrong in problems(point):
            console.print(Text(line, style="bold red" if wrong else "yellow"))


def problems(point: Point) -> Iterable[tuple[str, bool]]:
    """What a point's row cannot show: (line, whether it makes the run fail)."""
    where = (
        f"{point.engine}, {point.cache} / {point.label} / {_concurrency(point)} writers / "
        f"repeat {point.repeat + 1}"
    )
    if point.load.not_recorded:
        refused = point.load.not_recorded
        yield (
            f"{where}: {refused:,} increments were refused, nothing stored, so not expected",
            False,
        )
    for template, n in point.warnings.items():
        message = re.sub(r"%[rsd]", "...", template)
        yield f"{where}: library warning, {n:,} x: {message}", False
    if point.load.errors:
        seen = ", ".join(f"{n:,} x {kind}" for kind, n in sorted(point.load.errors.items()))
        yield f"{where}: errors of unknown outcome: {seen}", True
    if not point.check.exact:
        check = point.check
        cached = "" if check.cached is None else f" and the cached count {check.cached:,}"
        yield (
            f"{where}: WRONG COUNT: {check.expected:,} acknowledged, but "
            f"get_count(nocache=True) says {check.uncached:,}{cached}",
            True,
        )


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")

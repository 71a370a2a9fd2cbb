"""The tables of docs/benchmarks.md, made from a bench.json so that every number is that run's.

``python -m sharded_counter.tools.bench.markdown docs/bench.json`` prints them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .contenders import BY_KEY, CONTENDERS
from .results import median_points, paired_ratio
from .targets import TARGET_THREADS

# Shorter than the terminal's titles: these head table columns.
ENGINE_NAMES = {"classic": "classic", "firestore": "Firestore (Datastore mode)"}
CACHE_NAMES = {"memcached": "memcached", "redis": "Redis"}


def _name(key: str) -> str:
    """A part of the run by its bench.json key: ``classic`` (on memcached), ``classic/redis``."""
    engine, _, cache = key.partition("/")
    return f"{ENGINE_NAMES.get(engine, engine)}, {CACHE_NAMES.get(cache or 'memcached', cache)}"


def _rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:,.1f}"


def _table(header: Sequence[str], align: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def writers(engine: dict[str, Any]) -> str:
    """Increments/s per writer count, then the costs at the target's thread count."""
    points = median_points(engine)
    single = sorted({p["threads"] for p in points if p["processes"] == 1})
    several = sorted({(p["processes"], p["threads"]) for p in points if p["processes"] > 1})
    by = {(p["contender"], p["processes"], p["threads"]): p for p in points}
    order = [c.key for c in CONTENDERS]
    labels = sorted(
        dict.fromkeys((p["contender"], p["label"]) for p in points),
        key=lambda pair: order.index(pair[0]) if pair[0] in order else len(order),
    )
    at = TARGET_THREADS if TARGET_THREADS in single else single[-1]
    header = [
        "contender",
        *(f"{t} thr." for t in single),
        *(f"{n}x{t} proc." for n, t in several),
        f"vs blind at {at}",
        f"range at {at}",
        f"p50 / p99 ms at {at}",
        "aborts/inc",
        "RPCs/inc",
        "entities/inc",
        "memcache/inc",
        "client CPU/inc",
        "exact",
    ]
    rows = []
    for key, label in labels:
        rates = [by.get((key, 1, t)) for t in single] + [by.get((key, n, t)) for n, t in several]
        mine = [p for p in engine["writers"] if p["contender"] == key]  # every repeat
        here = by.get((key, 1, at))
        rows.append(
            [
                label,
                *("-" if p is None else _rate(p["rate"]) for p in rates),
                _ratio(here and here["ratio_to_blind"]),
                _range(here),
                _latency(here),
                _per(here and here["aborts_per_increment"]),
                _per(here and here["rpcs_per_increment"]),
                _per(here and here.get("entities_per_increment")),
                _per(here and here["memcache_per_increment"]),
                _micros(here),
                "yes" if all(p["exact"] for p in mine) else "**NO**",
            ]
        )
    notes = []
    # The shard counts adaptive sharding ended at, for the contender that starts from the
    # default count (the others start at the most they may use, or wrap one that does).
    for key, label in [(k, lab) for k, lab in labels if k == "counter-default"]:
        grown = [
            f"{p['processes']}x{p['threads']}: {'/'.join(map(str, p['shards_in_use']))}"
            for p in sorted(
                engine["writers"], key=lambda p: (p["processes"], p["threads"], p["repeat"])
            )
            if p["contender"] == key and p.get("shards_in_use")
        ]
        if grown:
            notes.append(
                f"\n\n{label}: shards each process spread its writes over at the end of "
                f"each repeat (adaptive sharding), {'; '.join(grown)}."
            )
    for key, why in engine["not_applicable"].items():
        label = BY_KEY[key].label if key in BY_KEY else key
        rows.append([label, *["n/a"] * (len(header) - 1)])
        notes.append(f"\n\n{label}: n/a, {why}.")
    return _table(header, ["---", *["---:"] * (len(header) - 2), "---"], rows) + "".join(notes)


def _range(point: dict[str, Any] | None) -> str:
    spread = point and point.get("spread")
    if not spread:
        return "-"
    return f"{_rate(spread['rate_min'])}-{_rate(spread['rate_max'])}"


def _latency(point: dict[str, Any] | None) -> str:
    spread = point and point.get("spread")
    if not spread or spread["latency_p50_ms"] is None:
        return "-"
    return f"{spread['latency_p50_ms']:.1f} / {spread['latency_p99_ms']:.1f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.2f}x"


def _per(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _micros(point: dict[str, Any] | None) -> str:
    if point is None or not point["load"]["acked"] or point["cpu"].get("client") is None:
        return "-"
    micros = 1e6 * point["cpu"]["client"] / point["load"]["acked"]
    return f"{micros:,.0f} µs" if micros >= 10 else f"{micros:.2f} µs"


def single_threaded(engines: dict[str, dict[str, Any]]) -> str:
    names = list(engines)
    header = [
        "loop (one thread, unless it says)",
        *(f"{_name(e)}: ops/s (ratio), client CPU per op" for e in names),
    ]
    timed = {
        e: {
            t["name"]: t for t in (*r["reads"], *r["buffer"], *r.get("fill", ()), *r.get("aio", ()))
        }
        for e, r in engines.items()
    }
    base = {
        "read-cached": "read-bare-get",
        "read-uncached": "read-bare-get",
        "read-bare-get": "read-bare-get",
        "buffer-increment": "dict-under-lock",
        "dict-under-lock": "dict-under-lock",
        "bounded-fill-far": "bounded-fill-far",
        "bounded-fill-last5": "bounded-fill-far",
        "counter-threads-16": "counter-threads-16",
        "aio-tasks-64": "counter-threads-16",
    }
    first = timed[names[0]]
    rows = []
    for name, entry in first.items():
        cells = []
        for engine in names:
            mine = timed[engine].get(name)
            reference = timed[engine].get(base.get(name, name))
            if mine is None:
                cells.append("-")
                continue
            ratio = (
                None
                if reference is None
                else paired_ratio(
                    mine.get("round_rates", ()),
                    reference.get("round_rates", ()),
                    mine["rate"],
                    reference["rate"],
                )
            )
            exact = "" if mine["exact"] else " **WRONG**"
            cpu = mine.get("cpu_per_op")
            spent = "" if cpu is None else f", {1e6 * cpu:.2f} µs"
            cells.append(f"{_rate(mine['rate'])} ({_ratio(ratio)}){spent}{exact}")
        # A loop named alike in every part may be labelled apart (the bare get: pymemcache's
        # on memcached, redis-py's on Redis): the row says each.
        labels = dict.fromkeys(timed[e][name]["label"] for e in names if name in timed[e])
        rows.append([" / ".join(labels) or entry["label"], *cells])
    return _table(header, ["---", *["---:"] * len(names)], rows)


def targets(data: dict[str, Any]) -> str:
    rows = []
    for target in data["targets"]:
        unit = target["unit"]

        def show(value: float | None, unit: str = unit) -> str:
            if value is None:
                return "-"
            return f"{value:.2f}x" if unit == "x" else f"{value:,.0f}{unit}"

        verdict = target["verdict"]
        rows.append(
            [
                target["target"],
                _name(target["engine"]),
                show(target["measured"]),
                ("<= " if target.get("at_most") else ">= ") + show(target["threshold"]),
                f"**{verdict}**" if verdict == "FAIL" else verdict,
            ]
        )
    return _table(["target", "engine", "measured", "needed", "verdict"], ["---"] * 5, rows)


def caches_side_by_side(data: dict[str, Any]) -> str:
    """What ran on more than one cache kind, each engine's caches in adjacent columns:
    increments/s at the target's thread count and from 2 x 8, with the ratio to the
    blind puts of the same part of the run."""
    engines = data["engines"]
    keys = list(engines)
    if len({engine.get("cache", "memcached") for engine in engines.values()}) < 2:
        return ""
    medians = {key: median_points(engine) for key, engine in engines.items()}
    shared = [c for c in CONTENDERS if len(c.caches) > 1]
    columns = [(TARGET_THREADS, 1), (8, 2)]
    header = [
        "contender",
        *(
            f"{_name(key)}: {'2x8 proc.' if procs > 1 else f'{threads} thr.'}"
            for key in keys
            for threads, procs in columns
        ),
    ]
    rows = []
    for contender in shared:
        cells = []
        for key in keys:
            by = {(p["contender"], p["threads"], p["processes"]): p for p in medians[key]}
            for threads, procs in columns:
                point = by.get((contender.key, threads, procs))
                cells.append(
                    "-"
                    if point is None
                    else f"{_rate(point['rate'])} ({_ratio(point['ratio_to_blind'])})"
                )
        rows.append([contender.label, *cells])
    return _table(header, ["---", *["---:"] * (len(header) - 1)], rows)


def render(data: dict[str, Any]) -> str:
    parts = []
    side_by_side = caches_side_by_side(data)
    if side_by_side:
        parts.append(f"Beside each other, increments/s (vs blind):\n\n{side_by_side}")
    for name, engine in data["engines"].items():
        parts.append(f"**{_name(name)}**, increments/s:\n\n{writers(engine)}")
    parts.append(single_threaded(data["engines"]))
    parts.append(targets(data))
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(args[0] if args else "docs/bench.json")
    sys.stdout.write(render(json.loads(path.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()

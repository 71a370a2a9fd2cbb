"""``python -m sharded_counter.tools.simulate``: search the protocol for broken promises.

::

    python -m sharded_counter.tools.simulate --minutes 5          # both engines
    python -m sharded_counter.tools.simulate --seed 7 --engine firestore   # replay one
    python -m sharded_counter.tools.simulate --mutations   # each broken rule, found?

Histories run seed after seed, alternating engines, until the time is up, on
one worker process per core (``--workers``); each failing seed is printed with
its violations and the operations before them, then shrunk (``shrink.py``) and
printed whole with the command that replays it; the exit status is 1 if any
failed. ``--seed`` replays one history (the same seed is the same history, event
for event; ``--processes``, ``--threads``, ``--stop-after``, ``--skip-faults`` and
``--skip-operations`` replay a shrunk one) and prints all of it. ``--mutations`` breaks each rule of
``mutations.py`` in turn and prints, as a Markdown table, how long the search
took to find it (at most ``--budget`` seconds each) and how short the history
shrank; the exit status is 1 if any went unfound.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

from .mutations import MUTATIONS, hunt
from .run import run_history
from .shrink import replay_command, shrink
from .world import Knobs, with_short_deadlines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharded_counter.tools.simulate")
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to search")
    parser.add_argument("--seed", type=int, help="replay this one seed, and print it all")
    parser.add_argument("--first-seed", type=int, default=0, help="where a search starts")
    parser.add_argument("--engine", choices=("classic", "firestore", "both"), default="both")
    parser.add_argument("--operations", type=int, default=Knobs.operations)
    parser.add_argument("--faults", type=int, default=Knobs.faults)
    parser.add_argument("--processes", type=int, default=Knobs.processes)
    parser.add_argument("--threads", type=int, default=Knobs.threads)
    parser.add_argument("--rpc-timeout", type=float, default=Knobs.rpc_timeout)
    parser.add_argument("--retry-deadline", type=float, default=Knobs.retry_deadline)
    parser.add_argument("--stop-after", type=int, help="start no operation after this many")
    parser.add_argument(
        "--skip-faults", default="", help="comma-separated fault numbers: drawn, not injected"
    )
    parser.add_argument(
        "--queue-past-deadline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="commits waiting on a lock outlive their callers' deadlines, as the Firestore "
        "emulator's do (docs/protocol.md, section 6); --no-queue-past-deadline drops "
        "them at their deadlines instead",
    )
    parser.add_argument("--mutations", action="store_true", help="hunt each broken rule")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per mutation")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one a core)"
    )
    parser.add_argument(
        "--skip-operations", default="", help="comma-separated operation numbers: drawn, not run"
    )
    args = parser.parse_args(argv)
    if args.mutations:
        return hunt_all(args.budget)
    engines = ["classic", "firestore"] if args.engine == "both" else [args.engine]

    def numbers(text: str) -> frozenset[int]:
        return frozenset(int(n) for n in text.split(",") if n.strip())

    def knobs(engine: str) -> Knobs:
        return Knobs(
            engine=engine,
            operations=args.operations,
            faults=args.faults,
            processes=args.processes,
            threads=args.threads,
            stop_after=args.stop_after,
            skip_faults=numbers(args.skip_faults),
            skip_operations=numbers(args.skip_operations),
            queue_past_deadline=args.queue_past_deadline,
            rpc_timeout=args.rpc_timeout,
            retry_deadline=args.retry_deadline,
        )

    if args.seed is not None:
        failed = False
        for engine in engines:
            outcome = run_history(args.seed, knobs(engine))
            print(outcome.report(context=None))
            failed = failed or not outcome.ok
        return 1 if failed else 0
    deadline = time.time() + args.minutes * 60
    jobs = [
        (
            index,
            args.workers,
            args.first_seed,
            deadline,
            engines,
            args.operations,
            args.faults,
            args.queue_past_deadline,
        )
        for index in range(args.workers)
    ]
    started = time.perf_counter()
    if args.workers == 1:
        done = [search(*jobs[0])]
    else:
        # One Python process per worker: a history is single-threaded, CPU-bound work.
        with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
            done = list(pool.map(search, *zip(*jobs, strict=True)))
    elapsed = time.perf_counter() - started
    runs = sum(ran for ran, _ in done)
    reports = [report for _, found in done for report in found]
    for report in reports:
        print(report)
    print(
        f"{runs} histories on {args.workers} worker(s) in {elapsed:.0f} s, "
        f"{runs / elapsed * 60:.0f} a minute; {len(reports)} failed"
    )
    return 1 if reports else 0


def search(
    index: int,
    workers: int,
    first_seed: int,
    deadline: float,
    engines: list[str],
    operations: int,
    faults: int,
    queue_past_deadline: bool = True,
) -> tuple[int, list[str]]:
    """One worker's share of a search: seeds ``first_seed + index``, then every
    ``workers``-th, on each engine, until ``deadline`` (Unix time). Returns how many
    histories ran, and the reports of those that failed."""
    runs, reports = 0, []
    seed = first_seed + index
    configurations = [
        Knobs(
            engine=engine,
            operations=operations,
            faults=faults,
            queue_past_deadline=queue_past_deadline,
        )
        for engine in engines
    ]
    configurations += [with_short_deadlines(k) for k in configurations if k.engine == "firestore"]
    while time.time() < deadline:
        for knobs in configurations:
            outcome = run_history(seed, knobs)
            runs += 1
            if not outcome.ok:
                short = shrink(outcome)
                reports.append(
                    f"{outcome.report()}\nshrunk:\n{short.report(context=None)}\n"
                    f"replay: {replay_command(short)}"
                )
        seed += workers
    return runs, reports


def hunt_all(budget: float) -> int:
    print(
        "| broken rule | mutation | found after | histories | seed (engine) "
        "| shrunk to | first violation |"
    )
    print("|---|---|---|---|---|---|---|")
    missed = 0
    for mutation in MUTATIONS:
        found = hunt(mutation, budget=budget)
        if found.found is None:
            missed += 1
            where, short, first = "-", "-", "**not found**"
        else:
            where = f"{found.found.seed} ({found.found.knobs.engine})"
            first = found.found.violations[0].split(" ", 1)[1][:70].replace("|", "/")
            with mutation.applied():
                shrunk = shrink(found.found)
            faults = sum("(skipped)" not in fault for fault in shrunk.faults)
            short = f"{shrunk.operations} ops, {faults} faults"
        print(
            f"| {mutation.rule} | `{mutation.name}` | {found.seconds:.1f} s | "
            f"{found.histories} | {where} | {short} | {first} |",
            flush=True,
        )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

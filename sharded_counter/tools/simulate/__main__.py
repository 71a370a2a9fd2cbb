"""``python -m sharded_counter.tools.simulate``: search the protocol for broken promises.

::

    python -m sharded_counter.tools.simulate --minutes 5          # both engines
    python -m sharded_counter.tools.simulate --seed 7 --engine firestore   # replay one

Histories run seed after seed, alternating engines, until the time is up;
each failing seed is printed with its violations and the operations before
them, and the exit status is 1 if any failed. ``--seed`` replays one history
(the same seed is the same history, event for event) and prints all of it.
"""

from __future__ import annotations

import argparse
import sys
import time

from .history import describe
from .run import run_history
from .world import Knobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharded_counter.tools.simulate")
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to search")
    parser.add_argument("--seed", type=int, help="replay this one seed, and print it all")
    parser.add_argument("--first-seed", type=int, default=0, help="where a search starts")
    parser.add_argument("--engine", choices=("classic", "firestore", "both"), default="both")
    parser.add_argument("--operations", type=int, default=Knobs.operations)
    parser.add_argument("--faults", type=int, default=Knobs.faults)
    args = parser.parse_args(argv)
    engines = ["classic", "firestore"] if args.engine == "both" else [args.engine]

    def knobs(engine: str) -> Knobs:
        return Knobs(engine=engine, operations=args.operations, faults=args.faults)

    if args.seed is not None:
        failed = False
        for engine in engines:
            outcome = run_history(args.seed, knobs(engine))
            print(describe(outcome.history.ops))
            print(outcome.report(context=0))
            failed = failed or not outcome.ok
        return 1 if failed else 0
    started = time.perf_counter()
    runs = failures = 0
    seed = args.first_seed
    while time.perf_counter() - started < args.minutes * 60:
        for engine in engines:
            outcome = run_history(seed, knobs(engine))
            runs += 1
            if not outcome.ok:
                failures += 1
                print(outcome.report(), flush=True)
        seed += 1
    elapsed = time.perf_counter() - started
    print(
        f"{runs} histories ({seed - args.first_seed} seeds x {len(engines)} engines) in "
        f"{elapsed:.0f} s, {runs / elapsed * 60:.0f} a minute; {failures} failed"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Make a failing history short enough for a person to read.

A seed's history is hundreds of operations and several faults; the broken promise
usually needs a handful. ``shrink`` replays the seed with less, keeping each cut
that still fails the same way (the same kind of violation, ``kind_of``):

1. fewer processes, then one thread each (these change the seed's draws: each is a
   new history, kept only if it still fails);
2. the fewest operations that still fail (``Knobs.stop_after``: the draws stay as
   they were, the history just ends sooner), by bisection;
3. each fault in turn left out (``Knobs.skip_faults``: drawn, not injected);
4. step 2 again, since fewer faults may need fewer operations;
5. each operation in turn left out (``Knobs.skip_operations``: drawn, not run).

What is left replays like any seed: ``replay_command`` prints the command line.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from .run import Outcome, run_history
from .world import Knobs

_INVARIANT = re.compile(r"(I\d+'?):")


def kind_of(violation: str) -> str:
    """What sort of promise a violation broke: the invariant it names (``I5``), or the
    first words of a check's message (``a read from``, ``the settled total``)."""
    text = violation.split(" ", 1)[1] if violation.startswith("t=") else violation
    named = _INVARIANT.match(text)
    return named.group(1) if named else " ".join(text.split()[:3])


def shrink(
    failed: Outcome, *, run: Callable[[int, Knobs], Outcome] = run_history, limit: int = 120
) -> Outcome:
    """The shortest failing history found from ``failed`` in at most ``limit`` replays
    (each a few hundredths of a second), failing as ``failed`` did."""
    assert not failed.ok, "only a failing history shrinks"
    wanted = kind_of(failed.violations[0])
    best = failed
    replays = 0

    def attempt(knobs: Knobs) -> bool:
        nonlocal best, replays
        if replays >= limit:
            return False
        replays += 1
        outcome = run(failed.seed, knobs)
        if any(kind_of(v) == wanted for v in outcome.violations):
            best = outcome
            return True
        return False

    for processes in range(1, best.knobs.processes):
        if attempt(dataclasses.replace(best.knobs, processes=processes)):
            break
    if best.knobs.threads > 1:
        attempt(dataclasses.replace(best.knobs, threads=1))
    _fewest_operations(best.knobs, attempt, lambda: best)
    for number in range(len(best.faults)):
        attempt(dataclasses.replace(best.knobs, skip_faults=best.knobs.skip_faults | {number}))
    _fewest_operations(best.knobs, attempt, lambda: best)
    for number in range(1, (best.knobs.stop_after or best.knobs.operations) + 1):
        attempt(
            dataclasses.replace(best.knobs, skip_operations=best.knobs.skip_operations | {number})
        )
    return best


def _fewest_operations(
    knobs: Knobs, attempt: Callable[[Knobs], bool], best: Callable[[], Outcome]
) -> None:
    """Bisect ``stop_after`` between 1 and the operations the best history started."""
    low, high = 0, best().operations  # a history of ``high`` operations fails
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(dataclasses.replace(best().knobs, stop_after=middle)):
            high = best().operations
        else:
            low = middle


def replay_command(outcome: Outcome) -> str:
    """The command line that replays ``outcome``'s history."""
    knobs = outcome.knobs
    words = [
        "python -m sharded_counter.tools.simulate",
        f"--seed {outcome.seed}",
        f"--engine {knobs.engine}",
        f"--processes {knobs.processes}",
        f"--threads {knobs.threads}",
        f"--operations {knobs.operations}",
        f"--faults {knobs.faults}",
    ]
    if knobs.rpc_timeout != Knobs.rpc_timeout or knobs.retry_deadline != Knobs.retry_deadline:
        words.append(f"--rpc-timeout {knobs.rpc_timeout} --retry-deadline {knobs.retry_deadline}")
    if knobs.stop_after is not None:
        words.append(f"--stop-after {knobs.stop_after}")
    if knobs.skip_faults:
        words.append("--skip-faults " + ",".join(str(n) for n in sorted(knobs.skip_faults)))
    if knobs.skip_operations:
        numbers = ",".join(str(n) for n in sorted(knobs.skip_operations))
        words.append(f"--skip-operations {numbers}")
    if not knobs.queue_past_deadline:
        words.append("--no-queue-past-deadline")
    return " ".join(words)

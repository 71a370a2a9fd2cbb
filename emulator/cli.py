"""``python -m sharded_counter_emulator``: run the backends for a shell, or check for them.

Deliberately argparse and the standard library only, so that it works before any of
the project's own dependencies are installed.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .datastore import DatastoreEmulator
from .deps import dependency_report
from .engines import ENGINES, Engine
from .errors import BackendError
from .memcached import Memcached
from .stack import BackendStack

# How often `start` looks whether a backend died under it.
_WATCH_INTERVAL = 1.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sharded_counter_emulator",
        description="Local Datastore emulators and memcached for sharded-counter.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = commands.add_parser(
        "start",
        help="start backends, print their environment, run until Ctrl-C or SIGTERM",
        description="Start the backends and print `export` lines for a shell; "
        "stop them all on Ctrl-C or SIGTERM.",
    )
    start.add_argument("--engine", choices=[*ENGINES, "both"], default="both",
                       help="which emulator(s) to run (default: both)")  # fmt: skip
    start.add_argument("--memcached", type=int, default=1, metavar="N",
                       help="number of memcached servers (default: 1)")  # fmt: skip
    start.add_argument("--timeout", type=float, default=90.0, metavar="SECONDS",
                       help="how long each backend may take to start (default: 90)")  # fmt: skip
    commands.add_parser(
        "check",
        help="report which dependencies are installed; exit nonzero if any is missing",
    )
    return parser


def _exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in env.items())


def _start(engine_choice: str, memcached: int, timeout: float) -> int:
    engines: tuple[Engine, ...] = (
        ENGINES if engine_choice == "both" else tuple(e for e in ENGINES if e == engine_choice)
    )
    if memcached < 0:
        print("--memcached must be zero or more", file=sys.stderr)
        return 2
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before starting, so that Ctrl-C during the start-up still stops
    # whatever has started by then rather than leaving JVMs behind.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = BackendStack(engines, memcached, timeout=timeout)
    try:
        try:
            stack.start()
        except BackendError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        blocks = [
            (f"# {engine}\n" if len(engines) > 1 else "") + _exports(stack.env(engine))
            for engine in engines
        ]
        print("\n".join(blocks), flush=True)
        print("# backends running; Ctrl-C or SIGTERM stops them", file=sys.stderr, flush=True)
        return _watch(stack, stop)
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch(stack: BackendStack, stop: threading.Event) -> int:
    """Wait for a stop request; fail early if a backend dies on its own."""
    backends: list[DatastoreEmulator | Memcached] = [
        *(stack.datastore[e] for e in stack.engines),
        *stack.memcached,
    ]
    while not stop.wait(_WATCH_INTERVAL):
        dead = [b for b in backends if not b.alive]
        if dead:
            print(f"error: exited unexpectedly: {', '.join(map(repr, dead))}", file=sys.stderr)
            return 1
    return 0


def _check() -> int:
    report = dependency_report()
    for status in report:
        print(f"{'ok' if status.ok else 'missing':<8} {status.name}: {status.detail}")
    return 0 if all(status.ok for status in report) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check()
    return _start(args.engine, args.memcached, args.timeout)

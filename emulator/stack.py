"""The Datastore emulators and memcached servers a test run needs, managed as one."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING

from .datastore import DEFAULT_PROJECT, DatastoreEmulator
from .engines import ENGINES, Engine, check_engine
from .errors import MissingDependency
from .memcached import Memcached

if TYPE_CHECKING:
    from typing_extensions import Self


def _run_all(tasks: list[Callable[[], object]]) -> list[BaseException]:
    """Run ``tasks`` on threads of their own; return the exceptions they raised."""
    if not tasks:
        return []
    # The backends spend their start-up time in other processes (mostly the JVM), so
    # threads overlap it fine and the slowest backend sets the total.
    with ThreadPoolExecutor(max_workers=len(tasks)) as pool:
        futures = [pool.submit(task) for task in tasks]
    return [error for future in futures if (error := future.exception()) is not None]


def _first_error(errors: list[BaseException]) -> BaseException:
    # A missing program explains the other failures and has the most useful message.
    return next((e for e in errors if isinstance(e, MissingDependency)), errors[0])


class _StartingEmulators(Mapping[str, DatastoreEmulator]):
    """``stack.datastore[engine]``: looking an engine up starts it if it is not running."""

    def __init__(self, stack: BackendStack) -> None:
        self._stack = stack

    def __getitem__(self, engine: str) -> DatastoreEmulator:
        if engine not in self._stack.engines:
            raise KeyError(engine)
        return self._stack.emulator(engine)

    def __iter__(self) -> Iterator[str]:
        return iter(self._stack.engines)

    def __len__(self) -> int:
        return len(self._stack.engines)


class BackendStack:
    """Emulators for ``engines`` plus ``memcached`` memcached servers.

    :meth:`start` (or ``with``) starts everything at once, concurrently. Without it,
    each backend starts on first use: ``stack.datastore[engine]``,
    :meth:`emulator`, :attr:`memcached` and :meth:`env` start what they need unless it
    is running already, so a run that only ever uses one engine never pays for the
    other, and a backend a test killed comes back for whoever asks next.
    """

    def __init__(
        self,
        engines: Iterable[str] = ENGINES,
        memcached: int = 1,
        *,
        project: str = DEFAULT_PROJECT,
        timeout: float = 90.0,
    ) -> None:
        if memcached < 0:
            raise ValueError("memcached must be zero or more")
        self.engines: tuple[Engine, ...] = tuple(dict.fromkeys(check_engine(e) for e in engines))
        self.timeout = timeout
        self._emulators = {e: DatastoreEmulator(e, project=project) for e in self.engines}
        self._memcached = [Memcached() for _ in range(memcached)]
        # One lock per backend: lazy starts from several threads start each backend once,
        # without one slow JVM holding up a request for another backend.
        self._locks: dict[object, threading.Lock] = {
            backend: threading.Lock() for backend in [*self._emulators.values(), *self._memcached]
        }
        self.datastore: Mapping[str, DatastoreEmulator] = _StartingEmulators(self)

    def __repr__(self) -> str:
        return f"<BackendStack engines={self.engines} memcached={len(self._memcached)}>"

    @property
    def running_engines(self) -> tuple[Engine, ...]:
        """The engines whose emulator is running now (nothing is started to find out)."""
        return tuple(e for e, emulator in self._emulators.items() if emulator.alive)

    def emulator(self, engine: str) -> DatastoreEmulator:
        """The emulator for ``engine``, started (alone) if it is not running yet."""
        emulator = self._emulators.get(check_engine(engine))
        if emulator is None:
            raise ValueError(
                f"engine {engine!r} is not part of this stack ({', '.join(self.engines)})"
            )
        self._ensure(emulator)
        return emulator

    @property
    def memcached(self) -> list[Memcached]:
        """The memcached servers, started if they are not running yet."""
        if all(m.alive for m in self._memcached):
            return list(self._memcached)
        errors = _run_all([functools.partial(self._ensure, m) for m in self._memcached])
        if errors:
            raise _first_error(errors)
        return list(self._memcached)

    def memcached_hosts(self) -> str:
        """MEMCACHED_HOSTS for all memcached servers: space-separated ``host:port``."""
        return " ".join(m.address for m in self.memcached)

    def env(self, engine: str) -> dict[str, str]:
        """``engine``'s emulator variables plus MEMCACHED_HOSTS (when there is memcached)."""
        env = self.emulator(engine).env()
        if self._memcached:
            env["MEMCACHED_HOSTS"] = self.memcached_hosts()
        return env

    @contextlib.contextmanager
    def activated(self, engine: str) -> Iterator[dict[str, str]]:
        """Point ``os.environ`` at ``engine``'s backends for the block, then put it back."""
        values = self.env(engine)
        saved = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            yield values
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def start(self) -> Self:
        """Start every backend not running yet, concurrently.

        If any fails, everything is stopped again and the first error (a
        MissingDependency in preference) is raised.
        """
        backends: list[DatastoreEmulator | Memcached] = [
            *self._emulators.values(),
            *self._memcached,
        ]
        errors = _run_all([functools.partial(self._ensure, b) for b in backends])
        if errors:
            self.stop()
            raise _first_error(errors)
        return self

    def stop(self) -> None:
        """Stop every backend (concurrently: each JVM takes a moment to exit)."""
        backends: list[DatastoreEmulator | Memcached] = [
            *self._emulators.values(),
            *self._memcached,
        ]
        errors = _run_all([b.stop for b in backends])
        if errors:
            raise errors[0]

    def _ensure(self, backend: DatastoreEmulator | Memcached) -> None:
        with self._locks[backend]:
            if not backend.alive:
                if isinstance(backend, DatastoreEmulator):
                    backend.start(self.timeout)
                else:
                    backend.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""What every backend process here has in common: a port, a process group, signals."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from .errors import BackendError
from .process import ManagedProcess

if TYPE_CHECKING:
    from typing_extensions import Self


class ProcessBackend:
    """A server run as its own process group on ``host``; subclasses start and stop it.

    The port is chosen on the first start and kept, so a restart brings the server
    back where clients expect it.
    """

    #: How messages name the server, e.g. "memcached".
    label = "the backend"

    def __init__(self, *, host: str, port: int | None) -> None:
        self.host = host
        self._port = port
        self._process: ManagedProcess | None = None
        self._timeout = 60.0  # the last start's timeout, which a restart reuses
        self._workdir: Path | None = None  # scratch directory (logs, default data) while up

    def start(self, timeout: float = 60.0) -> Self:  # each subclass has its own default
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server and delete its scratch directory; safe to call twice.

        A data directory passed in by the caller is not inside it and stays.
        """
        if self._process is not None:
            self._process.stop(self.stop_grace)
            self._process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise BackendError(f"{self.label} has no port yet: start it first")
        return self._port

    @property
    def address(self) -> str:
        """``host:port``, as clients are told where the server is."""
        return f"{self.host}:{self.port}"

    def _describe(self) -> str:
        """What ``repr`` shows before the address (a subclass may add to it)."""
        return type(self).__name__

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<{self._describe()} {self.host}:{self._port} {state}>"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.alive

    @property
    def pgid(self) -> int | None:
        """The process group id while it runs (for tests and fault injection)."""
        return self._process.pgid if self._process is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._process.log_path if self._process is not None else None

    #: Seconds a clean stop may take before the server is killed.
    stop_grace = 10.0

    def restart(self) -> Self:
        """Stop cleanly and start again on the same port (what survives is the
        subclass's to say: a data directory does, memcached's items do not).

        Raises BackendError if the server did not stop by itself within
        ``stop_grace`` seconds and had to be killed: then what it kept only in
        memory (an on-disk emulator's writes since its last clean stop) is gone,
        and the restart was not the clean one asked for.
        """
        if self._process is not None and not self._process.stop(self.stop_grace):
            raise BackendError(
                f"{self._describe()} did not stop within {self.stop_grace:g} s of SIGTERM "
                f"and was killed: this was no clean restart (log {self.log_path})"
            )
        return self.start(self._timeout)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; ``start`` brings it back on the same port."""
        if self._process is not None:
            self._process.kill()

    def pause(self) -> None:
        """Freeze the whole process group (SIGSTOP): requests hang until :meth:`resume`.

        Returns once every thread of it has stopped (see ``ManagedProcess.pause``).
        """
        self._running().pause()

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        self._running().resume()

    def _running(self) -> ManagedProcess:
        if self._process is None or not self._process.alive:
            raise BackendError(f"{self.label} on {self.host}:{self._port} is not running")
        return self._process

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

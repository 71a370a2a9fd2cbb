"""A throwaway memcached server on a loopback port."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .backend import ProcessBackend
from .deps import require_memcached
from .errors import BackendError
from .ports import free_port, port_is_free
from .probes import memcached_command, memcached_ok
from .process import ManagedProcess

if TYPE_CHECKING:
    from typing_extensions import Self


class Memcached(ProcessBackend):
    """One memcached process.

    The port is chosen on the first start and kept, so that :meth:`restart` brings the
    server back where clients expect it (empty, as a real restart would).
    """

    def __init__(
        self, *, host: str = "127.0.0.1", port: int | None = None, memory_mb: int = 64
    ) -> None:
        super().__init__(host=host, port=port)
        self.label = "memcached"
        self.memory_mb = memory_mb
        self._timeout = 10.0

    def env(self) -> dict[str, str]:
        """The variable clients read to find this server (google-cloud-ndb's convention)."""
        return {"MEMCACHED_HOSTS": self.address}

    @property
    def url(self) -> str:
        """``memcached://host:port``: this server as a ``cache_url``."""
        return f"memcached://{self.address}"

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server unless it runs already; return once it answers ``version``."""
        if self.alive:
            return self
        binary = require_memcached()
        if self._port is None:
            self._port = free_port(self.host)
        elif not port_is_free(self.host, self._port):
            raise BackendError(f"cannot start memcached: {self.address} is in use")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="sc-memcached-"))
        argv = [
            binary,
            "-l", self.host,
            "-p", str(self._port),
            "-U", "0",  # no UDP: nothing uses it, and it is one more port to collide on
            "-m", str(self.memory_mb),
            "-t", "2",
        ]  # fmt: skip
        if os.geteuid() == 0:
            # memcached refuses to run as root unless told which user to be.
            argv += ["-u", "root"]
        self._timeout = timeout
        self._process = ManagedProcess(
            f"memcached on {self.host}:{self._port}", argv, log_path=self._workdir / "memcached.log"
        )
        self._process.start(lambda: memcached_ok(self.host, self.port, timeout=1.0), timeout)
        return self

    def flush_all(self) -> None:
        """Drop every item in the cache."""
        self._running()
        reply = memcached_command(self.host, self.port, "flush_all")
        if reply != "OK":
            raise BackendError(f"memcached at {self.address} answered {reply!r} to flush_all")

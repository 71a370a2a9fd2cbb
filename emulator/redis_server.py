"""A throwaway redis-server (or valkey-server) on a loopback port, like ``memcached.py``."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

from .backend import ProcessBackend
from .errors import BackendError, MissingDependency
from .ports import free_port, port_is_free
from .probes import reply_line
from .process import ManagedProcess

if TYPE_CHECKING:
    from typing_extensions import Self

#: The servers that speak the Redis protocol, in the order they are looked for.
SERVER_BINARIES = ("redis-server", "valkey-server")

#: How a RedisServer keeps its data across a restart: not at all (as memcached), an
#: append-only file fsynced after every write or once a second, or RDB snapshots.
Persistence = Literal["none", "aof-always", "aof-everysec", "rdb"]
PERSISTENCE_MODES: tuple[Persistence, ...] = ("none", "aof-always", "aof-everysec", "rdb")


def persistence_args(persistence: Persistence, rdb_save: str = "3600 1") -> list[str]:
    """The redis-server options for ``persistence`` (its files go to ``--dir``).

    ``rdb`` snapshots on ``rdb_save`` (Redis's ``save`` syntax, "seconds changes")
    and on a clean shutdown; a SIGKILL loses what came after the last snapshot.
    """
    if persistence not in PERSISTENCE_MODES:
        raise ValueError(f"persistence must be one of {PERSISTENCE_MODES}, not {persistence!r}")
    if persistence.startswith("aof-"):
        fsync = persistence.removeprefix("aof-")
        return ["--save", "", "--appendonly", "yes", "--appendfsync", fsync]
    if persistence == "rdb":
        return ["--save", rdb_save, "--appendonly", "no"]
    # No snapshots, no log: a restart comes back empty, as memcached does.
    return ["--save", "", "--appendonly", "no"]


def require_redis_server(binary: str | None = None) -> str:
    """Return the server executable (``binary``, else redis-server, else valkey-server),
    or raise MissingDependency."""
    for name in (binary,) if binary else SERVER_BINARIES:
        found = shutil.which(name)
        if found is not None:
            return found
    raise MissingDependency(
        binary or "redis-server",
        "redis-server is not installed: run 'apt-get install -y redis-server'",
    )


def _resp(*words: str) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [f"${len(w.encode())}\r\n".encode() + w.encode() + b"\r\n" for w in words]
    return f"*{len(words)}\r\n".encode() + b"".join(parts)


def redis_command(
    host: str, port: int, *words: str, password: str | None = None, timeout: float = 2.0
) -> bytes:
    """Send one command (after ``AUTH password`` if given) and return the first line of
    its reply (a refused AUTH's reply instead)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if password is not None:
            sock.sendall(_resp("AUTH", password))
            authed = reply_line(sock)
            if authed != b"+OK":
                return authed
        sock.sendall(_resp(*words))
        return reply_line(sock)


def redis_ok(host: str, port: int, *, password: str | None = None, timeout: float = 2.0) -> bool:
    """Whether the server answers ``PING`` (it refuses it while loading its data)."""
    try:
        reply = redis_command(host, port, "PING", password=password, timeout=timeout)
    except OSError:
        return False
    return reply == b"+PONG"


class RedisServer(ProcessBackend):
    """One redis-server (or valkey-server) process.

    By default it keeps nothing on disk (``--save ''``, ``--appendonly no``): a
    restart brings it back empty, as memcached comes back. With ``persistence`` it
    keeps an append-only file (``aof-always``, ``aof-everysec``) or RDB snapshots
    (``rdb``) in its scratch directory, which ``restart``, and ``kill`` then
    ``start``, keep: the new process loads them, and ``start`` returns once it
    answers ``PING`` (it refuses commands while loading). ``stop`` deletes them.
    The port is chosen on the first start and kept. With ``password``, clients must
    AUTH (``requirepass``), as on Memorystore.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | None = None,
        password: str | None = None,
        persistence: Persistence = "none",
        rdb_save: str = "3600 1",
        options: Sequence[str] = (),
    ) -> None:
        super().__init__(host=host, port=port)
        self.binary = binary
        self.password = password
        self.persistence_args = persistence_args(persistence, rdb_save)
        self.persistence = persistence
        self.options = tuple(options)  # more server arguments (cluster mode's, say)
        self.label = binary or "redis-server"
        self._timeout = 10.0

    def env(self) -> dict[str, str]:
        """The variable a client reads to find this server."""
        return {"SHARDED_COUNTER_CACHE_URL": self.url}

    @property
    def url(self) -> str:
        """``redis://[:password@]host:port`` (``valkey://`` for a valkey-server), the
        password percent-encoded."""
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"{self.scheme}://{auth}{self.address}"

    @property
    def scheme(self) -> str:
        """``valkey`` for a valkey-server, else ``redis``: either URL reaches either."""
        return "valkey" if "valkey" in Path(self.binary or "redis-server").name else "redis"

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server unless it runs already; return once it answers ``PING``."""
        if self.alive:
            return self
        binary = require_redis_server(self.binary)
        if self._port is None:
            self._port = free_port(self.host)
        elif not port_is_free(self.host, self._port):
            raise BackendError(f"cannot start {self.label}: {self.address} is in use")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="sc-redis-"))
        argv = [
            binary,
            "--bind", self.host,
            "--port", str(self._port),
            *self.persistence_args,
            "--dir", str(self._workdir),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password is not None:
            argv += ["--requirepass", self.password]
        argv += self.options
        self._timeout = timeout
        self._process = ManagedProcess(
            f"{self.label} on {self.host}:{self._port}",
            argv,
            log_path=self._workdir / "redis.log",
        )
        self._process.start(
            lambda: redis_ok(self.host, self.port, password=self.password, timeout=1.0), timeout
        )
        return self

    def flush_all(self) -> None:
        """Drop every key, as memcached's ``flush_all`` does."""
        self._running()
        reply = redis_command(self.host, self.port, "FLUSHALL", password=self.password)
        if reply != b"+OK":
            raise BackendError(f"{self.label} at {self.address} answered {reply!r} to FLUSHALL")

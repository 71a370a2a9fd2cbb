"""A throwaway Redis Cluster on loopback: three primaries, each with one replica.

Six redis-server processes (``redis_server.RedisServer``, cluster mode on, nothing
kept on disk but each node's ``nodes.conf``), joined by ``redis-cli --cluster
create``. ``cluster-node-timeout`` is short (1000 ms by default), so when a primary
is killed its replica takes over by itself within a few seconds, as in production
but faster: ``kill_primary_of`` and ``wait_for_failover`` make that fault.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BackendError, BackendTimeout, MissingDependency
from .ports import free_port
from .redis_server import RedisServer, require_redis_server

if TYPE_CHECKING:
    from typing_extensions import Self

#: Every key lives in one of this many hash slots.
SLOTS = 16384

_POLL_INTERVAL = 0.05


def require_redis_cli() -> str:
    """The redis-cli executable, or MissingDependency."""
    found = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if found is None:
        raise MissingDependency(
            "redis-cli", "redis-cli is not installed: run 'apt-get install -y redis-server'"
        )
    return found


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES``: a node as another node sees it."""

    address: str  # host:port
    primary: bool
    failed: bool  # flagged fail or pfail, or disconnected
    slots: tuple[range, ...]

    def holds(self, slot: int) -> bool:
        return any(slot in r for r in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeView]:
    """``CLUSTER NODES`` output as NodeViews (slots being imported or migrated, the
    ``[...]`` entries, are left out)."""
    views = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@", 1)[0]
        flags = set(fields[2].split(","))
        slots = []
        for entry in fields[8:]:
            if entry.startswith("["):
                continue
            low, _, high = entry.partition("-")
            slots.append(range(int(low), int(high or low) + 1))
        views.append(
            NodeView(
                address=address,
                primary="master" in flags,
                failed=bool(flags & {"fail", "fail?", "noaddr"}) or fields[7] != "connected",
                slots=tuple(slots),
            )
        )
    return views


class RedisCluster:
    """Six cluster-mode redis-servers on loopback ports: 3 primaries, 3 replicas.

    ``start`` returns once every node says ``cluster_state:ok`` and all 16384 slots
    are served. The nodes keep nothing on disk except their cluster config, so a
    node killed and started again (``restart_node``) rejoins as a replica.
    """

    label = "redis cluster"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = 1000,
        binary: str | None = None,
    ) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        self.host = host
        self.node_timeout_ms = node_timeout_ms
        self.binary = binary
        self._replicas = replicas_per_primary
        self._count = primaries * (1 + replicas_per_primary)
        self.nodes: list[RedisServer] = []

    # -- start and stop -------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Self:
        """Start the six nodes, join them into a cluster, wait until it serves every slot."""
        if self.nodes:
            return self
        require_redis_server(self.binary)
        cli = require_redis_cli()
        deadline = time.monotonic() + timeout
        try:
            for _ in range(self._count):
                self.nodes.append(self._node().start(timeout))
            create = [cli, "--cluster", "create", *(n.address for n in self.nodes)]
            create += ["--cluster-replicas", str(self._replicas), "--cluster-yes"]
            done = subprocess.run(
                create,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
            if done.returncode != 0:
                raise BackendError(
                    f"redis-cli --cluster create failed ({done.returncode}):\n"
                    f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
            self._wait(self._serves_every_slot, deadline, "to serve all 16384 slots")
            self._wait(self._replicas_synced, deadline, "to sync every replica")
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self) -> RedisServer:
        # The bus port is chosen too (not port + 10000, which may be in use or in the
        # kernel's ephemeral range).
        options = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",  # in the node's own scratch directory
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-port", str(free_port(self.host)),
            # A replica syncs with its primary at once (not after the default 5 s wait
            # for more replicas), and takes over however long ago it last heard from
            # it: a primary killed right after start still fails over.
            "--repl-diskless-sync-delay", "0",
            "--cluster-replica-validity-factor", "0",
        ]  # fmt: skip
        return RedisServer(host=self.host, binary=self.binary, options=options)

    def stop(self) -> None:
        """Stop every node and delete their scratch directories; safe to call twice."""
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisCluster {', '.join(n.address for n in self.nodes) or 'stopped'}>"

    # -- what clients are told ------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis+cluster://host:port,...`` (``valkey+cluster://`` for valkey-servers):
        every node, as seeds."""
        if not self.nodes:
            raise BackendError("the redis cluster has no nodes yet: start it first")
        return f"{self.nodes[0].scheme}+cluster://" + ",".join(n.address for n in self.nodes)

    def env(self) -> dict[str, str]:
        """The variable a client reads to find this cluster."""
        return {"SHARDED_COUNTER_CACHE_URL": self.url}

    # -- looking at it --------------------------------------------------------------------

    def command(self, node: RedisServer, *words: str) -> str:
        """``words`` sent to ``node`` by redis-cli; its whole answer as text."""
        done = subprocess.run(
            [require_redis_cli(), "-h", node.host, "-p", str(node.port), *words],
            capture_output=True,
            text=True,
            timeout=5.0,
            check=False,
        )
        if done.returncode != 0:
            raise BackendError(f"redis-cli {' '.join(words)} at {node.address}: {done.stderr}")
        return done.stdout

    def live_nodes(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.alive]

    def slot_of(self, key: str) -> int:
        """The hash slot of ``key`` (``CLUSTER KEYSLOT``)."""
        return int(self.command(self.live_nodes()[0], "CLUSTER", "KEYSLOT", key))

    def views(self, node: RedisServer) -> list[NodeView]:
        """The cluster as ``node`` sees it."""
        return parse_cluster_nodes(self.command(node, "CLUSTER", "NODES"))

    def primaries(self) -> list[RedisServer]:
        """The live nodes that some live node sees as a primary serving slots."""
        seen = {v.address for v in self.views(self.live_nodes()[0]) if v.primary and v.slots}
        return [n for n in self.live_nodes() if n.address in seen]

    def primary_for(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot, as the live nodes agree on it."""
        slot = self.slot_of(key)
        owners = {self._owner(node, slot) for node in self.live_nodes()}
        if len(owners) != 1 or None in owners:
            raise BackendError(f"the nodes disagree on who serves slot {slot}: {owners}")
        (owner,) = owners
        return next(n for n in self.nodes if n.address == owner)

    def _owner(self, node: RedisServer, slot: int) -> str | None:
        held = [v for v in self.views(node) if v.primary and v.holds(slot)]
        return held[0].address if len(held) == 1 else None

    def _state_ok(self, node: RedisServer) -> bool:
        info = self.command(node, "CLUSTER", "INFO")
        return "cluster_state:ok" in info and f"cluster_slots_ok:{SLOTS}" in info

    def _serves_every_slot(self) -> bool:
        try:
            return all(self._state_ok(node) for node in self.live_nodes())
        except (BackendError, subprocess.TimeoutExpired):
            return False

    def _replicas_synced(self) -> bool:
        """Whether every replica has copied its primary and follows it."""
        try:
            infos = [self.command(node, "INFO", "replication") for node in self.live_nodes()]
        except (BackendError, subprocess.TimeoutExpired):
            return False
        replicas = [i for i in infos if "role:slave" in i]
        return len(replicas) == len(infos) - len(infos) // (1 + self._replicas) and all(
            "master_link_status:up" in i for i in replicas
        )

    def wait_replicated(self, primary: RedisServer, timeout: float = 10.0) -> None:
        """Wait until every replica of ``primary`` has copied all it wrote so far (each
        replica's offset, as the primary reports it, reaches the primary's own)."""

        def copied() -> bool:
            info = self.command(primary, "INFO", "replication")
            fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
            offset = int(fields["master_repl_offset"])
            replicas = [v for k, v in fields.items() if re.fullmatch(r"slave\d+", k)]
            acked = [int(dict(p.split("=", 1) for p in r.split(","))["offset"]) for r in replicas]
            return len(acked) == self._replicas and all(a >= offset for a in acked)

        self._wait(copied, time.monotonic() + timeout, f"to copy {primary.address}'s writes")

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        while not ready():
            if time.monotonic() >= deadline:
                raise BackendTimeout(f"{self!r} failed {what} in time")
            time.sleep(_POLL_INTERVAL)

    # -- faults and cleaning --------------------------------------------------------------

    def flush_all(self) -> None:
        """Drop every key: FLUSHALL on every primary (replicas follow it)."""
        for node in self.primaries():
            reply = self.command(node, "FLUSHALL").strip()
            if reply != "OK":
                raise BackendError(f"{node.address} answered {reply!r} to FLUSHALL")

    def kill_primary_of(self, key: str) -> RedisServer:
        """SIGKILL the primary that serves ``key``, as a crash would; return it."""
        node = self.primary_for(key)
        node.kill()
        return node

    def wait_for_failover(self, key: str, timeout: float = 30.0) -> RedisServer:
        """Wait until a live node serves ``key``'s slot, every live node agrees on it
        and says ``cluster_state:ok``; return that node (the promoted replica).

        No ``CLUSTER FAILOVER``: the replica takes over by itself once its primary has
        been unreachable for ``cluster-node-timeout`` and the other primaries agree.
        Raises BackendTimeout after ``timeout`` seconds.
        """
        slot = self.slot_of(key)
        promoted: list[RedisServer] = []

        def served() -> bool:
            try:
                owners = {self._owner(node, slot) for node in self.live_nodes()}
            except (BackendError, subprocess.TimeoutExpired):
                return False
            live = {n.address: n for n in self.live_nodes()}
            (owner,) = owners if len(owners) == 1 else (None,)
            if owner is None or owner not in live:
                return False
            promoted[:] = [live[owner]]
            return self._serves_every_slot()

        self._wait(
            served,
            time.monotonic() + timeout,
            f"to promote a replica for slot {slot} within {timeout:g} s",
        )
        return promoted[0]

    def restart_node(self, node: RedisServer, timeout: float = 30.0) -> None:
        """Start a killed node again on its port: it rejoins (a former primary as a
        replica of its successor). Returns once every node says ``cluster_state:ok``."""
        node.start()
        deadline = time.monotonic() + timeout

        def rejoined() -> bool:
            try:
                return all(not v.failed for v in self.views(node)) and self._serves_every_slot()
            except (BackendError, subprocess.TimeoutExpired):
                return False

        self._wait(rejoined, deadline, f"to take {node.address} back")

"""Pick TCP ports for backends to listen on."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000


def _listening_range() -> range:
    """Ports below the kernel's ephemeral range (where it picks the local port of every
    outgoing connection), so no client socket can take a port between our pick and the
    server's bind. 10000-32767 when the range cannot be read (Linux's default starts at
    32768)."""
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    return range(_LOWEST, max(low, _LOWEST + 1_000))


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now.

    Drawn at random below the ephemeral range: a port the kernel hands out
    (bind to port 0) is one any outgoing connection on the machine may take a
    moment later, before the server binds it; a test run opens thousands of
    connections, and an emulator then failed to start with "Address already in
    use". Among our own servers a clash needs two draws of the same port out of
    some 22,000 within the same instant.
    """
    ports = _listening_range()
    for _ in range(200):
        port = random.choice(ports)
        if port_is_free(host, port):
            return port
    raise OSError(f"no free port found in {ports.start}-{ports.stop - 1} on {host}")


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now.

    Checked before launching on a given port: otherwise a server already there (say,
    another emulator) would answer our readiness probe while ours fails to bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do, so a port left in TIME_WAIT by our own last run counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True

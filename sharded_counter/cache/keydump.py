"""Listing the keys a memcached server holds, and other one-off commands on their own socket.

Keys are listed with ``lru_crawler metadump all`` (memcached 1.4.31 and later).
The cluster uses it to find the counter records and stashes on a server it is
cleaning (see ``cluster.py``).
"""

from __future__ import annotations

import socket
from urllib.parse import unquote

from tenacity import RetryCallState, retry_if_result, stop_after_delay, wait_exponential

from .retrying import memcache_retrying

_BUSY_WAIT = 10.0  # seconds to wait out another crawl


class DumpFailed(Exception):
    """A server could not list its keys."""


def command(address: tuple[str, int], request: bytes, timeout: float) -> bytes:
    """Send ``request`` on a connection of its own; the first reply received."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        return sock.recv(4096)


def dump_keys(address: tuple[str, int], timeout: float) -> list[str]:
    """Every key a server holds, from ``lru_crawler metadump all`` (keys come URL-encoded).

    memcached runs one crawl at a time and answers BUSY meanwhile (perhaps to
    another process cleaning the same server), so BUSY is waited out for a while.
    """

    def give_up(state: RetryCallState) -> bytes:
        raise DumpFailed(f"memcached at {address} stayed busy crawling; cannot list its keys")

    waiting = memcache_retrying(
        f"listing the keys of memcached at {address}",
        stop=stop_after_delay(_BUSY_WAIT),
        retry=retry_if_result(lambda reply: reply.startswith(b"BUSY")),
        wait=wait_exponential(multiplier=0.01, max=0.5),
        give_up=give_up,
    )
    reply: bytes = waiting(_read_dump, address, timeout)
    if not reply.endswith(b"END\r\n"):
        raise DumpFailed(f"memcached at {address} cannot list its keys: {reply[:80]!r}")
    # Item lines end in a bare "\n"; only the closing END has "\r\n".
    return [
        unquote(line[4:].split(b" ", 1)[0].decode("ascii"))
        for line in reply.splitlines()
        if line.startswith(b"key=")
    ]


def _read_dump(address: tuple[str, int], timeout: float) -> bytes:
    data = bytearray()
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.settimeout(max(timeout, 2.0))  # a big cache takes a while to walk
        sock.sendall(b"lru_crawler metadump all\r\n")
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise DumpFailed(f"memcached at {address} closed the connection mid-dump")
            data += chunk
            if data.endswith(b"END\r\n"):
                return bytes(data)
            if not data.startswith(b"key=") and b"\n" in data:
                return bytes(data)  # a one-line answer: BUSY, ERROR, CLIENT_ERROR

"""Listing the keys a memcached server holds, and other one-off commands on their own socket.

Keys are listed with ``lru_crawler metadump all`` (memcached 1.4.31 and later).
The cluster uses it to find the counter records and stashes on a server it is
cleaning (see ``cluster.py``).
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from typing import IO
from urllib.parse import unquote

from tenacity import RetryCallState, retry_if_result, stop_after_delay, wait_exponential

from ..retrying import memcache_retrying

_BUSY_WAIT = 10.0  # seconds to wait out another crawl
_CHUNK = 1 << 16  # bytes read at a time: what a dump holds in memory at most
_HEAD = 256  # bytes enough to hold a one-line answer (BUSY, ERROR, CLIENT_ERROR ...)
_END = b"END\r\n"


class DumpFailed(Exception):
    """A server could not list its keys."""


def command(address: tuple[str, int], request: bytes, timeout: float) -> bytes:
    """Send ``request`` on a connection of its own; the first reply received."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        return sock.recv(4096)


def dump_keys(address: tuple[str, int], timeout: float) -> Iterator[str]:
    """Every key a server holds, from ``lru_crawler metadump all`` (keys come URL-encoded).

    memcached runs one crawl at a time and answers BUSY meanwhile (perhaps to
    another process cleaning the same server), so BUSY is waited out for a while.

    Streamed, in bounded memory whatever the server holds: the dump is read as
    fast as the server sends it into a temporary file (memcached's crawler gives
    up on a reader that stalls it for a second, so the caller's pace cannot set
    the reading's), then its keys are yielded one at a time. Raises ``DumpFailed``.
    """

    def give_up(state: RetryCallState) -> IO[bytes]:
        raise DumpFailed(f"memcached at {address} stayed busy crawling; cannot list its keys")

    waiting = memcache_retrying(
        f"listing the keys of memcached at {address}",
        stop=stop_after_delay(_BUSY_WAIT),
        retry=retry_if_result(lambda dump: dump is None),
        wait=wait_exponential(multiplier=0.01, max=0.5),
        give_up=give_up,
    )
    dump = waiting(_spool_dump, address, timeout)
    assert dump is not None  # give_up raised otherwise
    return _keys_in(dump)


def _keys_in(dump: IO[bytes]) -> Iterator[str]:
    with dump:
        # Item lines end in a bare "\n"; only the closing END has "\r\n".
        for line in dump:
            if line.startswith(b"key="):
                yield unquote(line[4:].split(b" ", 1)[0].decode("ascii"))


def _spool_dump(address: tuple[str, int], timeout: float) -> IO[bytes] | None:
    """The whole dump in a temporary file, at its start; None when the server is BUSY."""
    dump = tempfile.TemporaryFile()  # noqa: SIM115 - returned open, closed by _keys_in
    try:
        if _receive_dump(address, timeout, dump):
            dump.seek(0)
            return dump
    except BaseException:
        dump.close()
        raise
    dump.close()
    return None


def _receive_dump(address: tuple[str, int], timeout: float, dump: IO[bytes]) -> bool:
    """Write the dump's lines into ``dump``; False when the server answered BUSY."""
    head: bytes | None = b""  # the reply's first bytes, to tell a dump from a one-line answer
    tail = b""  # the last bytes received: the dump is over when they are END
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.settimeout(max(timeout, 2.0))  # a big cache takes a while to walk
        sock.sendall(b"lru_crawler metadump all\r\n")
        while True:
            chunk = sock.recv(_CHUNK)
            if not chunk:
                raise DumpFailed(f"memcached at {address} closed the connection mid-dump")
            if head is not None:
                head += chunk
                if b"\n" in head or len(head) >= _HEAD:
                    if not head.startswith((b"key=", _END)):
                        if head.startswith(b"BUSY"):
                            return False
                        raise DumpFailed(
                            f"memcached at {address} cannot list its keys: {head[:80]!r}"
                        )
                    head = None  # a dump: no need to look again
            dump.write(chunk)
            tail = (tail + chunk)[-len(_END) :]
            if tail == _END:
                return True

"""Tiny network clients used to tell whether a backend is up, and to poke it."""

from __future__ import annotations

import http.client
import socket
import urllib.error
import urllib.request

# An opener with no proxy handler: the backends are on loopback, and an http_proxy
# variable inherited from CI must not send readiness checks somewhere else.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(url: str, *, method: str = "GET", timeout: float = 2.0) -> tuple[int, bytes]:
    """Send one HTTP request without a body; return the status and the response body."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with _DIRECT.open(request, timeout=timeout) as response:
            status: int = response.status
            body: bytes = response.read()
            return status, body
    except urllib.error.HTTPError as error:
        # A status outside 2xx is still an answer: let the caller judge it.
        return error.code, error.read()


def http_ok(url: str, *, timeout: float = 2.0) -> bool:
    """Whether ``GET url`` answers ``Ok``: the emulators' health check.

    The body is ``Ok`` plus a newline, hence the strip.
    """
    try:
        status, body = http_request(url, timeout=timeout)
    except (OSError, http.client.HTTPException):
        # Refused, reset or half-written responses all mean "not up yet".
        return False
    return status == 200 and body.strip() == b"Ok"


def memcached_command(host: str, port: int, command: str, *, timeout: float = 2.0) -> str:
    """Send one text-protocol command to memcached and return its one-line reply."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(command.encode("ascii") + b"\r\n")
        reply = reply_line(sock)
    return reply.decode("ascii", errors="replace")


def reply_line(sock: socket.socket) -> bytes:
    """Read until the end of the first reply line (or until the server closes); stripped."""
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply.strip()


def memcached_ok(host: str, port: int, *, timeout: float = 2.0) -> bool:
    """Whether memcached answers ``version``."""
    try:
        return memcached_command(host, port, "version", timeout=timeout).startswith("VERSION ")
    except OSError:
        return False

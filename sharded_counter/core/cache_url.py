"""Which cache to use, from a URL: ``memcached://``, ``redis://``, ``valkey://`` and kin.

Pure parsing, no I/O: the text of ``SHARDED_COUNTER_CACHE_URL`` (or the
``cache_url`` setting) becomes a ``CacheUrl``, or a ``BadCacheUrl`` naming what
is wrong with it. It lives in ``core`` because ``settings.py`` checks the setting
with it, and settings may import only ``core`` and ``errors``; the settings turn
``BadCacheUrl`` (a ``ValueError``) into a ``ConfigurationError``.

The forms::

    memcached://host[:port][,host[:port]...]        port 11211 when left out
    redis://[[user]:password@]host[:port][/db]      port 6379, db 0 when left out
    rediss://...                                    the same, over TLS
    redis+cluster://[[user]:password@]host[:port][,host[:port]...]
    rediss+cluster://...                            the same, over TLS
    valkey://, valkeys://, valkey+cluster://, valkeys+cluster://   as the redis forms
    memory://[name]                                 this process's own, for tests only

A host is a name, an IPv4 address or a bracketed IPv6 address (``[::1]:6379``).
User and password are percent-decoded, as in any URL (``%40`` for ``@``).
Nothing may follow but the db: no query string or fragment, which would otherwise
be dropped without a word.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Literal
from urllib.parse import quote, unquote

#: A server family: what protocol its servers speak (``memory``: no server, the
#: process's own model of memcached, memory/backends.py).
Family = Literal["memcached", "redis", "valkey", "memory"]

#: scheme -> (family, TLS, cluster).
SCHEMES: dict[str, tuple[Family, bool, bool]] = {
    "memcached": ("memcached", False, False),
    "redis": ("redis", False, False),
    "rediss": ("redis", True, False),
    "redis+cluster": ("redis", False, True),
    "rediss+cluster": ("redis", True, True),
    "valkey": ("valkey", False, False),
    "valkeys": ("valkey", True, False),
    "valkey+cluster": ("valkey", False, True),
    "valkeys+cluster": ("valkey", True, True),
    "memory": ("memory", False, False),
}

DEFAULT_PORTS: dict[Family, int] = {"memcached": 11211, "redis": 6379, "valkey": 6379}

# A memory:// name: what a test may call one of several in-memory caches.
_MEMORY_NAME = re.compile(r"[A-Za-z0-9._-]*")

#: The highest db number accepted: Redis's own limit is what ``databases`` is set to
#: (16 by default), which only the server knows; this only keeps the number sane.
MAX_DB = 2**31 - 1

# A host name or IPv4 address: letters, digits, dots, hyphens, underscores (RFC 3986's
# reg-name, less the percent-encoding and sub-delimiters no server name needs).
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")


class BadCacheUrl(ValueError):
    """A cache URL we cannot use; the message names what is wrong."""


@dataclasses.dataclass(frozen=True)
class CacheUrl:
    """A parsed cache URL. ``hosts`` has one entry unless ``cluster`` or memcached."""

    scheme: str
    family: Family
    hosts: tuple[tuple[str, int], ...]
    tls: bool = False
    cluster: bool = False
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    db: int = 0
    name: str = ""  # memory:// only: which of the process's caches

    @property
    def redis_protocol(self) -> bool:
        """Spoken with the Redis protocol (Redis and Valkey both)."""
        return self.family in ("redis", "valkey")

    def redacted(self) -> str:
        """The URL again, with the password left out: safe to log."""
        if self.family == "memory":
            return f"memory://{self.name}"
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:***@"
        hosts = ",".join(_host_text(h, p) for h, p in self.hosts)
        db = f"/{self.db}" if self.db else ""
        return f"{self.scheme}://{auth}{hosts}{db}"


def _host_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_cache_url(text: str) -> CacheUrl:
    """Parse ``text`` as a cache URL; raise ``BadCacheUrl`` naming what is wrong."""
    if not isinstance(text, str):
        raise BadCacheUrl(f"a cache URL must be a str, not {type(text).__name__}")
    scheme, sep, rest = text.strip().partition("://")
    if not sep:
        raise BadCacheUrl(f"{_shown(text)} is not a URL: it needs a scheme, as in redis://host")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise BadCacheUrl(f"unknown cache URL scheme {scheme!r}; known: {known}")
    family, tls, cluster = SCHEMES[scheme]
    for mark, what in (("?", "a query string"), ("#", "a fragment")):
        if mark in rest:
            raise BadCacheUrl(f"{scheme}:// URLs take no options: {_shown(text)} has {what}")
    if family == "memory":
        if not _MEMORY_NAME.fullmatch(rest):
            raise BadCacheUrl(
                f"memory:// takes only a name of letters, digits, '.', '_' and '-', "
                f"not {_shown(rest)}"
            )
        return CacheUrl(scheme, family, (), name=rest)
    netloc, slash, path = rest.partition("/")
    if "@" in path:
        # A raw '/' in a password: the rest would be read as hosts, and echoed.
        raise BadCacheUrl(f"{scheme}:// URL has '@' after a '/': write '/' in a password as %2F")
    userinfo, at, hostlist = netloc.rpartition("@")
    username, password = _credentials(scheme, family, userinfo) if at else (None, None)
    hosts = _hosts(scheme, hostlist, DEFAULT_PORTS[family])
    if len(hosts) > 1 and family != "memcached" and not cluster:
        raise BadCacheUrl(
            f"{scheme}:// takes one host, not {len(hosts)}; for a cluster use {family}+cluster://"
        )
    db = _db(scheme, family, cluster, path) if slash else 0
    return CacheUrl(scheme, family, hosts, tls, cluster, username, password, db)


def _shown(text: str) -> str:
    """``text`` for an error message, without what could be a password."""
    scheme, sep, rest = text.partition("://")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return repr(f"{scheme}{sep}{netloc}{slash}{path}")


def _credentials(scheme: str, family: Family, userinfo: str) -> tuple[str | None, str | None]:
    if family == "memcached":
        raise BadCacheUrl("memcached:// URLs take no user or password: memcached has no AUTH")
    user, colon, password = userinfo.partition(":")
    if not colon:
        # A lone name before '@' is ambiguous (some clients read it as a password).
        raise BadCacheUrl(
            f"{scheme}:// needs ':' between user and password (':password@' for a password alone)"
        )
    if not password:
        raise BadCacheUrl(f"{scheme}:// has an empty password: leave out the '@' part instead")
    return (unquote(user) or None), unquote(password)


def _hosts(scheme: str, hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    if not hostlist:
        raise BadCacheUrl(f"{scheme}:// URL has no host")
    return tuple(_host(scheme, part, default_port) for part in hostlist.split(","))


def _host(scheme: str, spec: str, default_port: int) -> tuple[str, int]:
    host, port_text = _bracketed(scheme, spec) if spec.startswith("[") else _named(scheme, spec)
    return host, _port(scheme, spec, port_text, default_port)


def _bracketed(scheme: str, spec: str) -> tuple[str, str | None]:
    """``[v6]`` or ``[v6]:port``: the address, and the port's text if given."""
    inside, bracket, after = spec[1:].partition("]")
    if not bracket:
        raise BadCacheUrl(f"{scheme}:// host {spec!r} opens '[' and never closes it")
    try:
        ipaddress.IPv6Address(inside)
    except ValueError:
        raise BadCacheUrl(f"{scheme}:// host [{inside}] is not an IPv6 address") from None
    if after and not after.startswith(":"):
        raise BadCacheUrl(f"{scheme}:// host {spec!r} has {after!r} after its ']'")
    return inside, (after[1:] if after else None)


def _named(scheme: str, spec: str) -> tuple[str, str | None]:
    """``name`` or ``name:port``: the name, and the port's text if given."""
    host, colon, port = spec.partition(":")
    if not host:
        raise BadCacheUrl(f"{scheme}:// URL has an empty host in {spec!r}")
    if not _HOST_NAME.fullmatch(host):
        raise BadCacheUrl(f"{scheme}:// host {host!r} is not a host name or address")
    return host, (port if colon else None)


def _port(scheme: str, spec: str, text: str | None, default_port: int) -> int:
    if text is None:
        return default_port
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise BadCacheUrl(f"{scheme}:// host {spec!r} has port {text!r}, not 1-65535")
    return int(text)


def _db(scheme: str, family: Family, cluster: bool, path: str) -> int:
    if not path:
        return 0  # "redis://host/" is db 0, as redis-py reads it
    if family == "memcached":
        raise BadCacheUrl(f"memcached:// URLs take no path, not /{path}: memcached has no dbs")
    if not path.isascii() or not path.isdigit() or int(path) > MAX_DB:
        raise BadCacheUrl(f"{scheme}:// db must be a number from 0 to {MAX_DB}, not {path!r}")
    if cluster and int(path) != 0:
        raise BadCacheUrl(f"{scheme}:// has only db 0, not {path}")
    return int(path)

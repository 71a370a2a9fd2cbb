"""Where each setting comes from.

Precedence, highest first:

1. keyword arguments to ``Counter(...)``;
2. class attributes of a ``Counter`` subclass (``shards = 20``);
3. the global ``config['sharded_counter']`` dict;
4. the environment (``MEMCACHED_HOSTS``, ``SHARDED_COUNTER_CACHE_URL``);
5. the TOML file named by ``SHARDED_COUNTER_CONFIG``, else ``config/sharded_counter.toml``
   in the working directory when it exists (its ``[sharded_counter]`` table);
6. the defaults below.

Every value is checked when a counter is made, before anything is written. The
file is read once per process (again only if ``SHARDED_COUNTER_CONFIG`` or the
working directory changes); ``reload()`` has it read again after you edit it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .core.cache_url import BadCacheUrl, parse_cache_url
from .core.validation import check_shards
from .errors import ConfigurationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

SECTION = "sharded_counter"
CONFIG_ENV = "SHARDED_COUNTER_CONFIG"
DEFAULT_CONFIG_FILE = Path("config") / "sharded_counter.toml"
WRITE_MODES = ("auto", "transaction", "transform")

#: The global configuration, as in tipfy: ``config['sharded_counter'] = {'shards': 20}``.
config: dict[str, dict[str, Any]] = {}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every option, with its default."""

    shards: int = 10
    memcached_hosts: tuple[str, ...] = ()
    # Checked, not yet used to connect (docs/cache-backends.md); may hold a password.
    cache_url: str | None = dataclasses.field(default=None, repr=False)
    cache_ttl: int = 3600
    memcache_timeout: float = 0.5
    memcache_connect_timeout: float = 0.5
    key_prefix: str = "sc"
    retry_attempts: int = 8
    retry_deadline: float = 10.0
    retry_initial_wait: float = 0.01
    retry_max_wait: float = 1.0
    rpc_timeout: float = 5.0
    write_mode: str = "auto"
    max_concurrent_writes: int = 4
    group_commit: bool = True
    max_shards: int = 20
    idempotency_ttl: int = 86400
    project: str | None = None
    database: str | None = None
    namespace: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check = _CHECKS.get(field.name)
            if check is not None:
                object.__setattr__(self, field.name, check(field.name, getattr(self, field.name)))


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Settings))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive int, not {value!r}")
    return value


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} must be a positive number, not {value!r}")
    if value != value or value == float("inf"):
        raise ConfigurationError(f"{name} must be finite, not {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be true or false, not {value!r}")
    return value


def _shards(name: str, value: Any) -> int:
    try:
        return int(check_shards(value))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from None


def _cache_ttl(name: str, value: Any) -> int:
    seconds = _positive_int(name, value)
    # memcached reads an expiry above 30 days as a unix timestamp.
    if seconds > 30 * 24 * 3600:
        raise ConfigurationError(f"{name} must be at most 2592000 seconds (30 days), not {seconds}")
    return seconds


def _key_prefix(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 64:
        raise ConfigurationError(f"{name} must be a non-empty str of at most 64 chars")
    if not all("!" <= ch <= "~" for ch in value):
        # memcache keys travel in a text protocol: no spaces or control bytes.
        raise ConfigurationError(f"{name} must be printable ASCII without spaces: {value!r}")
    return value


def _write_mode(name: str, value: Any) -> str:
    if value not in WRITE_MODES:
        raise ConfigurationError(f"{name} must be one of {', '.join(WRITE_MODES)}, not {value!r}")
    return str(value)


def _optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a str, not {type(value).__name__}")
    return value or None


def _hosts(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)) or not all(isinstance(h, str) for h in value):
        raise ConfigurationError(f"{name} must be a list of 'host:port' strings")
    for host in value:
        parse_host(host)
    return tuple(value)


def parse_host(spec: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) into its parts, checking the port."""
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"memcached host must look like 'host:port', not {spec!r}")
    return host.strip("[]"), int(port)


def _cache_url(name: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    try:
        parse_cache_url(value)
    except BadCacheUrl as exc:
        raise ConfigurationError(f"{name}: {exc}") from None
    return str(value).strip()


_CHECKS = {
    "shards": _shards,
    "memcached_hosts": _hosts,
    "cache_url": _cache_url,
    "cache_ttl": _cache_ttl,
    "memcache_timeout": _positive_number,
    "memcache_connect_timeout": _positive_number,
    "key_prefix": _key_prefix,
    "retry_attempts": _positive_int,
    "retry_deadline": _positive_number,
    "retry_initial_wait": _positive_number,
    "retry_max_wait": _positive_number,
    "rpc_timeout": _positive_number,
    "write_mode": _write_mode,
    "max_concurrent_writes": _positive_int,
    "group_commit": _bool,
    "max_shards": _shards,
    "idempotency_ttl": _positive_int,
    "project": _optional_str,
    "database": _optional_str,
    "namespace": _optional_str,
}


def _check_known(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {', '.join(unknown)} in {where}; "
            f"known: {', '.join(sorted(OPTION_NAMES))}"
        )
    return dict(options)


def config_file_path() -> Path | None:
    """The config file in force, or None when there is none."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigurationError(f"{CONFIG_ENV} names {named!r}, which is not a file")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_file(path: Path) -> dict[str, Any]:
    """The ``[sharded_counter]`` table of a TOML file, read now."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
    table = data.get(SECTION, {})
    if not isinstance(table, dict):
        raise ConfigurationError(f"[{SECTION}] in {path} must be a table")
    return _check_known(table, str(path))


# The file's options, read once per process: (where it was looked for, the options).
# Looked for again only if $SHARDED_COUNTER_CONFIG or the working directory changed.
_loaded: tuple[tuple[str | None, str], dict[str, Any]] | None = None
_loading = threading.Lock()


def _file_options() -> dict[str, Any]:
    global _loaded
    where = (os.environ.get(CONFIG_ENV), os.getcwd())
    loaded = _loaded
    if loaded is not None and loaded[0] == where:
        return loaded[1]
    with _loading:
        path = config_file_path()
        options = load_file(path) if path is not None else {}
        _loaded = (where, options)
    return options


def reload() -> None:
    """Read the config file again on the next ``resolve()`` (after you changed it).

    The file is read once per process; counters made before a reload keep the
    settings they were made with.
    """
    global _loaded
    _loaded = None


def _environment() -> dict[str, Any]:
    hosts = os.environ.get("MEMCACHED_HOSTS", "").strip()
    url = os.environ.get("SHARDED_COUNTER_CACHE_URL", "").strip()
    return {**({"memcached_hosts": hosts} if hosts else {}), **({"cache_url": url} if url else {})}


def resolve(
    arguments: Mapping[str, Any] | None = None,
    class_options: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge every source in precedence order into one checked ``Settings``."""
    merged: dict[str, Any] = dict(_file_options())
    merged.update(_environment())
    section = config.get(SECTION, {})
    if not isinstance(section, Mapping):
        raise ConfigurationError(f"config[{SECTION!r}] must be a dict")
    merged.update(_check_known(section, f"config[{SECTION!r}]"))
    merged.update(_check_known(class_options or {}, "class attributes"))
    merged.update(_check_known(arguments or {}, "arguments"))
    return Settings(**merged)

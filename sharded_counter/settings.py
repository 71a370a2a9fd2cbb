"""Where each setting comes from.

Precedence, highest first:

1. keyword arguments to ``Counter(...)``;
2. class attributes of a ``Counter`` subclass (``shards = 20``);
3. the global ``config['sharded_counter']`` dict;
4. the environment (``MEMCACHED_HOSTS``, ``SHARDED_COUNTER_CACHE_URL``,
   ``SHARDED_COUNTER_CACHE_CA_FILE``, ``SHARDED_COUNTER_DATASTORE_URL``);
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .core.cache_url import BadCacheUrl, parse_cache_url
from .core.validation import (
    check_choice,
    check_flag,
    check_host_port,
    check_int,
    check_memcached_ttl,
    check_seconds,
    check_text,
)
from .errors import ConfigurationError, ConfigurationTypeError

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
    # May hold a password, so repr leaves it out.
    cache_url: str | None = dataclasses.field(default=None, repr=False)
    # The CA certificates (PEM) that a rediss:// or valkeys:// server's certificate
    # must chain to, in place of the system's (Memorystore gives each instance its own).
    cache_ca_file: str | None = None
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
    # None: Google's Datastore (or the emulator DATASTORE_EMULATOR_HOST names);
    # "memory://" or "memory://classic": this process's own, for tests (memory/backends.py).
    datastore_url: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            checked = _as_setting(_CHECKS[field.name], getattr(self, field.name), field.name)
            object.__setattr__(self, field.name, checked)
        if self.max_shards < self.shards:
            # Writes start on ``shards`` and grow up to ``max_shards``: the other way
            # round is a typo, which would otherwise pass silently.
            raise ConfigurationError(
                f"max_shards ({self.max_shards}) must be at least shards ({self.shards})"
            )


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Settings))


# Each option's check (core/validation.py: one rule per kind of value, shared with
# every class's constructor arguments), raising TypeError or ValueError.
_Check = Callable[[Any, str], Any]


def _seconds(value: Any, name: str) -> float:
    return check_seconds(value, name)


def _positive_int_up_to(high: int) -> _Check:
    return lambda value, name: check_int(value, name, 1, high)


def _shards(value: Any, name: str) -> int:
    return check_int(value, name, 1, MAX_SHARDS)


def _key_prefix(value: Any, name: str) -> str:
    prefix = check_text(value, name, 64)
    if not all("!" <= ch <= "~" for ch in prefix):
        # memcache keys travel in a text protocol: no spaces or control bytes.
        raise ValueError(f"{name} must be printable ASCII without spaces: {prefix!r}")
    return prefix


def _write_mode(value: Any, name: str) -> str:
    return check_choice(value, name, WRITE_MODES)


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return value or None


def _hosts(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of 'host:port' strs, not {type(value).__name__}")
    for host in value:
        check_host_port(host, f"{name} entry")
    return tuple(value)


def parse_host(spec: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) into its parts, checking the port."""
    return _as_setting(check_host_port, spec, "memcached host")  # type: ignore[no-any-return]


def _cache_url(value: Any, name: str) -> str | None:
    """A cache URL (core/cache_url.py), or None for none; BadCacheUrl is a ValueError."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    try:
        parse_cache_url(value)
    except BadCacheUrl as exc:  # says what is wrong, and never repeats a password
        raise ValueError(f"{name}: {exc}") from None
    return value.strip()


#: What ``datastore_url`` may say: an in-memory Datastore of either engine.
DATASTORE_URLS = ("memory://", "memory://firestore", "memory://classic")


def _datastore_url(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if value.strip() not in DATASTORE_URLS:
        raise ValueError(
            f"{name} is one of {', '.join(DATASTORE_URLS)} (an in-memory Datastore for "
            f"tests), or unset for Google's, not {value!r}"
        )
    return value.strip()


#: The most shards a counter may have: every uncached read and every ``count = v``
#: touches all of them.
MAX_SHARDS = 10_000
#: The longest an idempotency key may be remembered: ten years, in seconds. Its
#: record's ``expire_at`` must stay a Datastore timestamp (before year 10000).
MAX_IDEMPOTENCY_TTL = 3650 * 24 * 3600

_CHECKS: dict[str, _Check] = {
    "shards": _shards,
    "memcached_hosts": _hosts,
    "cache_url": _cache_url,
    "cache_ca_file": _optional_str,
    "cache_ttl": check_memcached_ttl,
    "memcache_timeout": _seconds,
    "memcache_connect_timeout": _seconds,
    "key_prefix": _key_prefix,
    "retry_attempts": _positive_int_up_to(1000),
    "retry_deadline": _seconds,
    "retry_initial_wait": _seconds,
    "retry_max_wait": _seconds,
    "rpc_timeout": _seconds,
    "write_mode": _write_mode,
    "max_concurrent_writes": _positive_int_up_to(1000),
    "group_commit": check_flag,
    "max_shards": _shards,
    "idempotency_ttl": _positive_int_up_to(MAX_IDEMPOTENCY_TTL),
    "project": _optional_str,
    "database": _optional_str,
    "namespace": _optional_str,
    "datastore_url": _datastore_url,
}


def _as_setting(check: _Check, value: Any, name: str) -> Any:
    """``check(value, name)``, its TypeError a ConfigurationTypeError and its ValueError a
    ConfigurationError: a bad setting is a ConfigurationError, as the docs promise,
    and a wrong type is a TypeError too, as for every other argument."""
    try:
        return check(value, name)
    except TypeError as exc:
        raise ConfigurationTypeError(str(exc)) from None
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


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
    ca_file = os.environ.get("SHARDED_COUNTER_CACHE_CA_FILE", "").strip()
    datastore_url = os.environ.get("SHARDED_COUNTER_DATASTORE_URL", "").strip()
    return {
        **({"datastore_url": datastore_url} if datastore_url else {}),
        **({"memcached_hosts": hosts} if hosts else {}),
        **({"cache_url": url} if url else {}),
        **({"cache_ca_file": ca_file} if ca_file else {}),
    }


def resolve(
    arguments: Mapping[str, Any] | None = None,
    class_options: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge every source in precedence order into one checked ``Settings``."""
    merged: dict[str, Any] = dict(_file_options())
    _layer(merged, _environment())
    section = config.get(SECTION, {})
    if not isinstance(section, Mapping):
        raise ConfigurationError(f"config[{SECTION!r}] must be a dict")
    _layer(merged, _check_known(section, f"config[{SECTION!r}]"))
    _layer(merged, _check_known(class_options or {}, "class attributes"))
    _layer(merged, _check_known(arguments or {}, "arguments"))
    _max_shards_follows_shards(merged)
    return Settings(**merged)


def _layer(merged: dict[str, Any], options: Mapping[str, Any]) -> None:
    """Lay ``options`` over what lower places gave. The cache is named by whichever place
    named one last: ``memcached_hosts`` given here drops a ``cache_url`` from below (a
    ``Counter(memcached_hosts=...)`` is not overridden by $SHARDED_COUNTER_CACHE_URL);
    given both in one place, ``cache_url`` wins."""
    if "memcached_hosts" in options and "cache_url" not in options:
        merged.pop("cache_url", None)
    merged.update(options)


def _max_shards_follows_shards(merged: dict[str, Any]) -> None:
    """Left unset, ``max_shards`` is its default or ``shards``, whichever is more:
    ``Counter('hits', shards=50)`` spreads over 50 shards and does not grow. Set
    anywhere below ``shards``, it is refused (``Settings`` checks that)."""
    shards = merged.get("shards")
    default = Settings().max_shards
    if "max_shards" not in merged and isinstance(shards, int) and not isinstance(shards, bool):
        merged["max_shards"] = max(default, shards)

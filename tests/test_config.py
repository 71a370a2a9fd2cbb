"""Where settings come from, and how bad ones are refused. No backends needed."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharded_counter import ConfigurationError, Settings, config
from sharded_counter.settings import OPTION_NAMES, reload, resolve

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_config_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MEMCACHED_HOSTS", raising=False)
    monkeypatch.chdir(tmp_path)  # no config/ directory here


def test_defaults() -> None:
    settings = resolve()
    assert settings.shards == 10
    assert settings.memcached_hosts == ()
    assert settings.write_mode == "auto"


def test_shipped_config_file_lists_every_default() -> None:
    """config/sharded_counter.toml documents the defaults; uncommented, it must equal them."""
    text = (REPO / "config" / "sharded_counter.toml").read_text()
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") and " = " in line else line for line in text.splitlines()
    )
    table = tomllib.loads(uncommented)["sharded_counter"]
    defaults = dataclasses.asdict(Settings())
    example_only = {
        "project",
        "database",
        "namespace",
        "cache_url",
        "cache_ca_file",
        "datastore_url",
    }
    assert set(table) == set(defaults)
    for option, value in table.items():
        if option in example_only:
            continue
        assert defaults[option] == (tuple(value) if isinstance(value, list) else value), option


def write_file(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def test_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_file(
        tmp_path / "config" / "sharded_counter.toml",
        '[sharded_counter]\nshards = 3\ncache_ttl = 30\nmemcached_hosts = ["file:1"]\n'
        'key_prefix = "file"\nretry_attempts = 2\n',
    )
    assert resolve().shards == 3  # the file beats the defaults
    monkeypatch.setenv("MEMCACHED_HOSTS", "env:1 env:2")
    assert resolve().memcached_hosts == ("env:1", "env:2")  # the environment beats the file
    config["sharded_counter"] = {"shards": 4, "memcached_hosts": ["dict:1"]}
    settings = resolve()
    assert (settings.shards, settings.memcached_hosts) == (4, ("dict:1",))  # the dict beats both
    assert resolve(class_options={"shards": 5}).shards == 5  # a class attribute beats the dict
    assert resolve({"shards": 6}, {"shards": 5}).shards == 6  # an argument beats everything
    assert resolve().cache_ttl == 30  # untouched options still come from the file


def test_the_file_is_read_once_until_reload(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_file(tmp_path / "once.toml", "[sharded_counter]\nshards = 7\n")
    monkeypatch.setenv("SHARDED_COUNTER_CONFIG", str(path))
    assert resolve().shards == 7
    write_file(path, "[sharded_counter]\nshards = 8\n")
    assert resolve().shards == 7  # not read again for every counter
    reload()
    assert resolve().shards == 8


def test_config_file_named_by_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_file(tmp_path / "elsewhere.toml", "[sharded_counter]\nshards = 7\n")
    monkeypatch.setenv("SHARDED_COUNTER_CONFIG", str(path))
    assert resolve().shards == 7
    monkeypatch.setenv("SHARDED_COUNTER_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError, match="not a file"):
        resolve()


def test_bad_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_file(tmp_path / "bad.toml", "[sharded_counter\n")
    monkeypatch.setenv("SHARDED_COUNTER_CONFIG", str(path))
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        resolve()
    write_file(path, "[sharded_counter]\nshard = 3\n")
    with pytest.raises(ConfigurationError, match="unknown option"):
        resolve()


def test_unknown_option_in_dict_is_refused() -> None:
    config["sharded_counter"] = {"shardz": 3}
    with pytest.raises(ConfigurationError, match="shardz"):
        resolve()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("shards", 0),
        ("shards", -1),
        ("shards", 2.5),
        ("shards", True),
        ("shards", "20"),
        ("cache_ttl", 0),
        ("cache_ttl", 31 * 24 * 3600),
        ("memcache_timeout", 0),
        ("memcache_timeout", float("nan")),
        ("memcache_timeout", float("inf")),
        ("key_prefix", "has space"),
        ("key_prefix", ""),
        ("key_prefix", "é"),
        ("write_mode", "fast"),
        ("memcached_hosts", ["nohost"]),
        ("memcached_hosts", ["host:99999"]),
        ("memcached_hosts", [1]),
        ("project", 5),
    ],
)
def test_bad_values_are_refused(option: str, value: Any) -> None:
    with pytest.raises(ValueError):
        resolve({option: value})


@given(st.dictionaries(st.sampled_from(sorted(OPTION_NAMES)), st.from_type(object)))
def test_fuzzed_options_are_valid_or_refused_cleanly(options: dict[str, Any]) -> None:
    try:
        settings = resolve(options)
    except (TypeError, ValueError):
        return
    assert isinstance(settings.shards, int) and settings.shards >= 1

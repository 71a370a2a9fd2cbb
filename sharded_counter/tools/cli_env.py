"""``sharded-counter env``: the settings a Counter would get here, and where each came from."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from ..core.cache_url import parse_cache_url
from ..settings import (
    CONFIG_ENV,
    DEFAULT_CONFIG_FILE,
    SECTION,
    config,
    config_file_path,
    load_file,
    resolve,
)
from .cli_console import clean_errors, stdout

# The variables that decide where a Counter made from the environment connects.
ENVIRONMENT = (
    "DATASTORE_EMULATOR_HOST",
    "DATASTORE_DATASET",
    "DATASTORE_PROJECT_ID",
    "GOOGLE_CLOUD_PROJECT",
    "MEMCACHED_HOSTS",
    CONFIG_ENV,
)


@click.command()
def env() -> None:
    """Show the settings a Counter would get here, and their sources."""
    with clean_errors():
        path = config_file_path()
        settings = resolve()
        file_options = load_file(path) if path is not None else {}
    console = stdout()
    table = Table(title="settings")
    table.add_column("option")
    table.add_column("value", overflow="fold")
    table.add_column("from")
    for field in dataclasses.fields(settings):
        table.add_row(
            field.name,
            Text(_show(_redacted(field.name, getattr(settings, field.name)))),
            _source(field.name, file_options),
        )
    console.print(table)
    where = Table(show_header=False, title="environment")
    where.add_column("name")
    where.add_column("value", overflow="fold")
    where.add_row("config file", Text(str(path) if path is not None else _no_config_file()))
    for variable in ENVIRONMENT:
        value = os.environ.get(variable)
        where.add_row(variable, Text(value if value is not None else "(not set)"))
    console.print(where)


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, tuple):
        return " ".join(value) if value else "(none)"
    return str(value)


def _redacted(option: str, value: Any) -> Any:
    """A cache URL without its password; any other value as it is."""
    return parse_cache_url(value).redacted() if option == "cache_url" and value else value


def _source(option: str, file_options: dict[str, Any]) -> str:
    # Mirrors config.resolve's precedence for the sources a CLI process can have.
    if option in config.get(SECTION, {}):
        return "config dict"
    if option == "memcached_hosts" and os.environ.get("MEMCACHED_HOSTS", "").strip():
        return "MEMCACHED_HOSTS"
    if option == "cache_url" and os.environ.get("SHARDED_COUNTER_CACHE_URL", "").strip():
        return "SHARDED_COUNTER_CACHE_URL"
    if option in file_options:
        return "config file"
    return "default"


def _no_config_file() -> str:
    return f"none (${CONFIG_ENV} is unset and {DEFAULT_CONFIG_FILE} does not exist here)"

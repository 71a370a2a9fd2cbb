"""The ``sharded-counter`` command: the demo, the bench, and commands to poke at real counters.

This module is the group and its entry point; the commands live by what they
act on: ``cli_counters`` (counters themselves), ``cli_bounded`` (bounded
counters), ``cli_env`` (the settings), ``cli_cache_tier`` (rate limits, time
series, locks) and ``cli_races`` (demo and bench). ``cli_console`` is how they all print and fail.
"""

from __future__ import annotations

import click

from .. import __version__
from . import cli_bounded, cli_cache_tier, cli_counters, cli_env, cli_races
from .cli_time import parse_when

__all__ = ["main", "parse_when"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
# From the module, not the installed metadata: it also works from a source checkout.
@click.version_option(version=__version__, prog_name="sharded-counter")
def main() -> None:
    """Sharded counters on Google Cloud Datastore with memcache in front."""


for _command in (
    *cli_races.COMMANDS,
    *cli_counters.COMMANDS,
    *cli_bounded.COMMANDS,
    cli_env.env,
    *cli_cache_tier.COMMANDS,
):
    main.add_command(_command)

"""What every test starts from: no global config and no config file named by the environment."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faultkit import ReplyHoldingRelay

from sharded_counter import Settings, config
from sharded_counter.cache.client import build_client
from sharded_counter.settings import reload
from sharded_counter_emulator import Memcached


@pytest.fixture(autouse=True)
def clean_global_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # config['sharded_counter'] is process-wide: one test's settings must not leak into the next.
    monkeypatch.delenv("SHARDED_COUNTER_CONFIG", raising=False)
    config.clear()
    reload()  # the config file is read once per process: each test reads its own
    yield
    config.clear()
    reload()


@pytest.fixture
def own_memcache(sharded_counter_cache: Any) -> Iterator[Callable[..., Any]]:
    """Make clients of the session's cache (whichever ``--sc-cache`` names) of this
    test's own, as a fresh process would have them.

    A memcached restart leaves the idle pooled sockets of every client in the process
    stale, and each then fails once (test_a_memcached_restart_while_idle_costs_no_increment
    pins that bug). Tests of other properties use clients of their own so it cannot blur
    them. ``make(**options)`` takes the Settings options for timeouts.
    """
    made: list[Any] = []

    def make(**options: Any) -> Any:
        client = build_client(Settings(cache_url=sharded_counter_cache.url, **options))
        made.append(client)
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            client.close()


@pytest.fixture
def relay(
    sharded_counter_backends: Any, sharded_counter_engine: str
) -> Iterator[ReplyHoldingRelay]:
    """A ReplyHoldingRelay in front of this test's emulator, closed however the test ends."""
    emulator = sharded_counter_backends.emulator(sharded_counter_engine)
    holding = ReplyHoldingRelay(emulator.host, emulator.port)
    yield holding
    holding.close()


@pytest.fixture
def trio() -> Iterator[list[Memcached]]:
    """Three memcached servers of the test's own, for the cluster tests."""
    servers = [Memcached().start() for _ in range(3)]
    try:
        yield servers
    finally:
        for server in servers:
            if server.alive:
                server.resume()  # a paused server would not stop
            server.stop()

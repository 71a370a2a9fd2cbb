"""What every test starts from: no global config and no config file named by the environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sharded_counter import config


@pytest.fixture(autouse=True)
def clean_global_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # config['sharded_counter'] is process-wide: one test's settings must not leak into the next.
    monkeypatch.delenv("SHARDED_COUNTER_CONFIG", raising=False)
    config.clear()
    yield
    config.clear()

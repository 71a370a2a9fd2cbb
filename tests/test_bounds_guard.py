"""A plain ``Counter`` (and the CLI's ``increment`` and ``set``) refuses a counter that
has bounds stored, instead of breaking them (issue 26). Both engines, real memcached.

The check is one Datastore lookup per counter per process (paths/bounds_guard.py);
a spy counts the real lookups.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

from sharded_counter import BoundedCounter, Counter, LimitReached
from sharded_counter.aio import AsyncCounter, aclose
from sharded_counter.errors import CounterIsBounded
from sharded_counter.store.escrow import EscrowStore
from sharded_counter.tools.cli import main
from sharded_counter_emulator import free_port

pytestmark = pytest.mark.backends

# A Datastore that is down: no retries worth waiting for, and quick to say so.
UNREACHABLE: dict[str, Any] = {"retry_attempts": 1, "retry_deadline": 0.3, "rpc_timeout": 0.3}


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names whose stored bounds were looked up (the real lookup runs: a spy)."""
    seen: list[str] = []
    real = EscrowStore.stored_steps

    def spied(store: EscrowStore, name: str) -> Any:
        seen.append(name)
        return real(store, name)

    monkeypatch.setattr(EscrowStore, "stored_steps", spied)
    return seen


def test_a_plain_counter_refuses_a_bounded_counters_name(
    sharded_counter_env: dict[str, str],
) -> None:
    seats = BoundedCounter("guarded-seats", maximum=3)
    seats.increment(3)
    plain = Counter("guarded-seats")
    writes: list[Callable[[], None]] = [
        lambda: plain.increment(),
        lambda: plain.increment(-1),
        lambda: plain.increment(1, idempotency_key="k"),
        lambda: plain.set_count(10),
    ]
    for write in writes:
        with pytest.raises(CounterIsBounded) as refused:
            write()
        assert (refused.value.minimum, refused.value.maximum) == (None, 3)
    # Nothing was written: the bounds still hold.
    assert plain.get_count(nocache=True) == 3
    with pytest.raises(LimitReached):
        seats.increment()
    assert plain.count == 3  # reading is fine


def test_an_async_counter_refuses_a_bounded_counters_name(
    sharded_counter_env: dict[str, str],
) -> None:
    BoundedCounter("guarded-async", maximum=2).increment(2)

    async def main() -> list[str]:
        plain = AsyncCounter("guarded-async")
        refused = []
        for write in (plain.increment, lambda: plain.set_count(7)):
            try:
                await write()
            except CounterIsBounded as exc:
                refused.append(exc.maximum)
        await aclose()
        return refused

    assert asyncio.run(main()) == [2, 2]
    assert Counter("guarded-async").get_count(nocache=True) == 2  # nothing written


def test_a_plain_counter_looks_once_per_process(
    sharded_counter_env: dict[str, str], lookups: list[str]
) -> None:
    counter = Counter("guarded-plain")
    for _ in range(5):
        counter.increment()
    Counter("guarded-plain").increment()  # another object, same counter and backend
    counter.count = 2
    assert lookups == ["guarded-plain"]
    assert counter.get_count(nocache=True) == 2


def test_a_bounded_counters_own_writes_are_not_refused(
    sharded_counter_env: dict[str, str],
) -> None:
    quota = BoundedCounter("guarded-quota", minimum=0, maximum=10)
    quota.increment(4)
    quota.count = 6
    quota.increment(-1)
    assert quota.get_count(nocache=True) == 5


def test_a_deleted_bounded_counter_can_be_written_plainly_again(
    sharded_counter_env: dict[str, str],
) -> None:
    quota = BoundedCounter("guarded-deleted", maximum=10)
    quota.increment(4)
    plain = Counter("guarded-deleted")
    with pytest.raises(CounterIsBounded):
        plain.increment()
    quota.delete()
    plain.increment(20)  # past the old maximum: it has none now
    assert plain.get_count(nocache=True) == 20


@pytest.mark.needs_processes
def test_with_datastore_down_the_check_does_not_refuse_the_increment(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, lookups: list[str]
) -> None:
    """The lookup fails: the increment goes its usual way (here: stashed in memcache),
    and the next writes within ``retry_deadline`` do not look again."""
    # One attempt per write, so the long deadline only spaces out the looks.
    options = UNREACHABLE | {"retry_deadline": 60.0}
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        counter = Counter("guarded-down", **options)
        for delta in (7, 1, 2):
            counter.increment(delta)
    assert lookups == ["guarded-down"]
    assert Counter("guarded-down").count == 10  # the stash is counted by reads


def test_the_cli_refuses_increment_and_set_of_a_bounded_name(
    sharded_counter_env: dict[str, str],
) -> None:
    BoundedCounter("guarded-cli", maximum=5).increment(2)
    for args in (["increment", "guarded-cli", "4"], ["set", "guarded-cli", "9"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "BoundedCounter" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert Counter("guarded-cli").get_count(nocache=True) == 2
    shown = CliRunner().invoke(main, ["bounded", "guarded-cli", "--max", "9"])
    assert shown.exit_code == 0, shown.output

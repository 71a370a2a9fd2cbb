"""Long-running flushers: the SharedBuffer flusher thread and ``sharded-counter flush --every``.

Every test runs once per Datastore engine against the real emulator and real
memcached. The Datastore outage is real: the emulator is reached through a relay
that is cut (connections refused, as for a server that went down) and restored;
the flusher process is the real command, sent a real SIGTERM. The one fake is a
counter class that fails for one name (no backend fails for one name alone), and
the test that uses it says so.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from faultkit import ReplyHoldingRelay, probe_through_relay

from sharded_counter import Counter, SharedBuffer
from sharded_counter.patterns.shared_buffer import FlushBackoff, FlushRound
from sharded_counter.tools.cli import main

pytestmark = pytest.mark.backends

NAMES = [f"flushed-{i}" for i in range(8)]
WAIT = 90.0  # seconds: generous, for a loaded machine; the conditions are what is tested


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {timeout} s waiting for {what}"
        time.sleep(0.05)


def flush_failures(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.getMessage().startswith(f"shared buffer: flush of {name!r} failed")
    ]


def totals(names: list[str]) -> dict[str, int]:
    return {name: Counter(name).get_count(nocache=True) for name in names}


def test_the_flusher_thread_outlives_a_datastore_outage_and_then_flushes_everything(
    sharded_counter_env: dict[str, str],
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    probe_through_relay()
    caplog.set_level(logging.WARNING, logger="sharded_counter")
    buffer = SharedBuffer(interval=0.2, retry_deadline=1.0, rpc_timeout=0.5)
    names = NAMES[:4]  # each costs retry_deadline per failed round
    expected = {name: 0 for name in names}
    for _ in range(3):
        for i, name in enumerate(names):
            buffer.increment(name, i + 1)
            expected[name] += i + 1
    relay.cut()  # Datastore down: every write is refused
    try:
        buffer.start_flusher()
        # Two failed rounds for one name: the thread met the outage and kept going.
        wait_until(lambda: len(flush_failures(caplog, names[0])) >= 2, "two failed rounds")
        assert buffer.flusher_running
        for name in names:  # increments keep landing in memcache meanwhile
            buffer.increment(name, 100)
            expected[name] += 100
    finally:
        relay.restore()
    try:
        wait_until(
            lambda: all(buffer.pending(name) == 0 for name in names), "every amount to be flushed"
        )
        assert buffer.flusher_running
    finally:
        buffer.stop()
    assert totals(names) == expected
    failed = flush_failures(caplog, names[0])
    assert all(r.levelno == logging.WARNING for r in failed)  # a down backend: no traceback
    assert all("next round in" in r.getMessage() for r in failed)


class FailsForOneName(Counter):
    """A fake: a counter whose pending write raises for one name, a bug of its own.

    No backend fails for one counter name alone, so this stands for whatever
    might (a bug, a corrupt entity); the other counters are real counters.
    """

    poisoned = "poisoned"

    def write_pending(self) -> None:
        if self.name == self.poisoned:
            raise RuntimeError("this counter's own trouble")
        super().write_pending()


def test_a_name_that_fails_for_its_own_reason_is_logged_and_the_rest_flush(
    sharded_counter_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sharded_counter")
    buffer = SharedBuffer(interval=0.2, counter_class=FailsForOneName)
    names = [*NAMES[:3], FailsForOneName.poisoned, *NAMES[3:6]]
    for name in names:
        buffer.increment(name, 5)
    buffer.start_flusher()
    try:
        wait_until(
            lambda: all(buffer.pending(n) == 0 for n in names if n != FailsForOneName.poisoned),
            "the other counters to be flushed",
        )
        # More increments after the failure flush too: the thread did not stop.
        for name in NAMES[:3]:
            buffer.increment(name, 1)
        wait_until(lambda: all(buffer.pending(n) == 0 for n in NAMES[:3]), "a later round")
        assert buffer.flusher_running
    finally:
        buffer._stop.set()  # stop() would flush once more and raise for the poisoned name
    failed = flush_failures(caplog, FailsForOneName.poisoned)
    assert failed and failed[0].levelno == logging.ERROR
    assert failed[0].exc_info is not None and "own trouble" in str(failed[0].exc_info[1])
    assert buffer.pending(FailsForOneName.poisoned) == 5  # kept, and reads count it
    assert Counter(FailsForOneName.poisoned).count == 5
    assert totals(NAMES[:6]) == {n: 6 if n in NAMES[:3] else 5 for n in NAMES[:6]}


def test_the_backoff_doubles_to_its_cap_with_jitter_and_resets_after_a_good_round() -> None:
    from sharded_counter import DatastoreUnavailable

    backoff = FlushBackoff(interval=1.0, cap=10.0, jitter=0.5)
    bad = FlushRound(failed={"x": DatastoreUnavailable("down")})
    own = FlushRound(failed={"x": RuntimeError("a bug")})
    waits = [backoff.after(bad) for _ in range(8)]
    assert 1.0 <= waits[0] <= 2.0 and 2.0 <= waits[1] <= 4.0 and 4.0 <= waits[2] <= 8.0
    assert all(5.0 <= w <= 10.0 for w in waits[4:])  # capped, half of it jittered
    assert backoff.after(own) == 1.0  # a counter's own failure is no reason to wait
    assert backoff.after(bad) <= 2.0  # counting starts again


# -- the command: flush --every ---------------------------------------------------------


@pytest.mark.parametrize("every", ["nan", "inf", "-1", "0", f"{threading.TIMEOUT_MAX * 2}"])
def test_every_refuses_what_sleep_cannot_take(every: str) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["flush", "--every", every])
    assert result.exit_code == 2, result.output  # a usage error, before anything runs
    assert "--every" in result.output


def _flusher_process(every: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sharded_counter", "flush", "--every", str(every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _held_locks(buffer: SharedBuffer, names: list[str]) -> list[str]:
    return [name for name in names if buffer.flush_holder(name) is not None]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_flush_every_finishes_its_round_on_sigterm_and_releases_its_locks(
    sharded_counter_env: dict[str, str],
    sharded_counter_backends: Any,
    sharded_counter_engine: str,
    stop: signal.Signals,
) -> None:
    """SIGTERM (or SIGINT) while the command is mid-round (its writes held up by a frozen
    emulator, its flush locks taken): it finishes the round, exits 0, leaves no lock held."""
    emulator = sharded_counter_backends.emulator(sharded_counter_engine)
    buffer = SharedBuffer(interval=60)
    names = [f"stopped-{i}" for i in range(20)]
    process = _flusher_process(0.2)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("flushed"), "setup: no first round"
        emulator.pause()  # the next round's writes wait, its locks held
        try:
            for name in names:  # memcache only: no Datastore call, so none waits
                buffer.increment(name, 3)
            wait_until(lambda: bool(_held_locks(buffer, names)), "the flusher to take a lock")
            process.send_signal(stop)
            time.sleep(0.5)  # no race: the command waits for its round whenever this ends
            assert process.poll() is None, "it exited mid-round"
        finally:
            emulator.resume()
        _, err = process.communicate(timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert f"{stop.name}: round finished, locks released" in err
    assert _held_locks(buffer, names) == []
    # A second flusher takes every lock at once (a held one would be skipped), and
    # nothing was lost or counted twice.
    written = buffer.flush_round(names)
    assert written.failed == {} and written.written == names
    assert totals(names) == {name: 3 for name in names}
    assert all(buffer.pending(name) == 0 for name in names)

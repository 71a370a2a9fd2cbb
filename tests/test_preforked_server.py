"""A real pre-forking server, end to end: gunicorn ``--preload`` with 3 sync workers
serving tests/apps/preforked.py, whose module-level Counter and SharedBuffer the
master made and used before forking. A bounded load on loopback; every request
that was answered 200 must be counted once, cached and uncached."""

from __future__ import annotations

import collections
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sharded_counter import Counter, SharedBuffer
from sharded_counter_emulator import free_port

pytestmark = pytest.mark.backends

APPS = Path(__file__).parent / "apps"
WORKERS = 3
CLIENTS = 6
REQUESTS_EACH = 100


@pytest.fixture
def server(sharded_counter_env: dict[str, str]) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            f"--workers={WORKERS}",
            "--worker-class=sync",
            f"--bind=127.0.0.1:{port}",
            f"--pythonpath={APPS}",
            "--graceful-timeout=10",
            "preforked:app",
        ],
        env={**os.environ, **sharded_counter_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_until_serving(port, process)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_until_serving(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            assert process.stderr is not None
            raise AssertionError(f"gunicorn exited: {process.stderr.read().decode()[-2000:]}")
        try:
            status, _ = _request(port, "GET", "/pid")
        except OSError:
            time.sleep(0.1)
            continue
        if status == 200:
            return
    raise AssertionError("gunicorn did not serve within 60 s")


def _request(port: int, method: str, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_every_acknowledged_request_is_counted_once_under_gunicorn_preload(
    server: int,
) -> None:
    answers: collections.Counter[int] = collections.Counter()
    failures: list[str] = []
    pids: set[str] = set()
    lock = threading.Lock()

    def client() -> None:
        for _ in range(REQUESTS_EACH):
            status, body = _request(server, "POST", "/hit")
            with lock:
                answers[status] += 1
                if status == 200:
                    pids.add(body)
                else:
                    failures.append(body)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []  # a healthy backend: no request failed
    acknowledged = answers[200]
    assert acknowledged == CLIENTS * REQUESTS_EACH
    assert len(pids) >= 2  # several forked workers served, each on its own connections
    hits = Counter("preforked:hits")
    assert hits.get_count(nocache=True) == acknowledged
    assert hits.count == acknowledged
    shared = SharedBuffer()
    shared.flush()
    assert shared.pending("preforked:buffered") == 0
    assert shared.count("preforked:buffered", nocache=True) == acknowledged

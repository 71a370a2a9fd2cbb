"""OpenTelemetry: what a configured SDK sees of the counters (sharded_counter/telemetry.py).

Metrics are read with the SDK's in-memory reader and spans with its in-memory
exporter, both real SDK objects; the counters run on the real backends (both
engines, real memcached). Datastore "down" is a port nothing listens on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import connected
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sharded_counter import Counter, IncrementNotRecorded, __version__, telemetry
from sharded_counter_emulator import free_port

pytestmark = pytest.mark.backends

UNREACHABLE = {"retry_attempts": 1, "retry_deadline": 0.3, "rpc_timeout": 0.3}


class Seen:
    """What the SDK collected since the test began."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.spans = InMemorySpanExporter()
        tracing = TracerProvider()
        tracing.add_span_processor(SimpleSpanProcessor(self.spans))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer_provider = tracing

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for found in scope.metrics
            if found.name == metric
            for point in found.data.data_points
        ]

    def total(self, metric: str, **attributes: str) -> int:
        return sum(
            int(p.value)
            for p in self.points(metric)
            if all(p.attributes.get(k) == v for k, v in attributes.items())
        )

    def by_outcome(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for point in self.points("sharded_counter.increments"):
            outcome = str(point.attributes["outcome"])
            found[outcome] = found.get(outcome, 0) + int(point.value)
        return {k: v for k, v in found.items() if v}


@pytest.fixture
def seen() -> Iterator[Seen]:
    collected = Seen()
    telemetry.configure(
        meter_provider=collected.meter_provider, tracer_provider=collected.tracer_provider
    )
    yield collected
    telemetry.configure()  # back to the global providers
    collected.meter_provider.shutdown()
    collected.tracer_provider.shutdown()


def test_fifty_increments_show_as_fifty_with_their_durations(
    sharded_counter_env: dict[str, str], seen: Seen
) -> None:
    counter = Counter("otel-hits", shards=20)

    def write() -> None:
        for _ in range(10):
            counter.increment()

    threads = [threading.Thread(target=write) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.get_count(nocache=True) == 50
    assert seen.by_outcome() == {"written": 50}
    [duration] = [
        p for p in seen.points("sharded_counter.increment.duration") if p.count
    ]  # one series: outcome=written
    assert duration.count == 50 and duration.sum > 0
    assert dict(duration.attributes) == {"outcome": "written"}
    writes = seen.total("sharded_counter.shard_writes")
    assert 1 <= writes <= 50  # group commit may share writes among the threads
    commits = [s for s in seen.spans.get_finished_spans() if s.name == "Datastore/Commit"]
    assert len(commits) >= writes
    assert commits[0].attributes is not None
    assert commits[0].attributes["rpc.method"] == "Commit"
    assert commits[0].attributes["rpc.service"] == "google.datastore.v1.Datastore"


def test_cached_reads_count_hits_and_misses(
    sharded_counter_env: dict[str, str], seen: Seen
) -> None:
    counter = Counter("otel-reads")
    counter.increment(3)
    assert counter.count == 3  # nothing cached yet: a miss fills the record
    assert counter.count == 3
    assert counter.count == 3
    assert seen.total("sharded_counter.cache.misses") == 1
    assert seen.total("sharded_counter.cache.hits") == 2


def test_outcomes_when_datastore_or_memcache_fail(
    sharded_counter_env: dict[str, str], seen: Seen, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        stashing = connected(Counter("otel-down", **UNREACHABLE))
        nowhere = connected(
            Counter("otel-down", memcached_hosts=[f"127.0.0.1:{free_port()}"], **UNREACHABLE)
        )
    stashing.increment(5)  # Datastore down, memcache up: kept in delayed_incr
    with pytest.raises(IncrementNotRecorded):
        nowhere.increment(2)  # and memcache down too: not counted
    assert seen.by_outcome() == {"stashed": 1, "not_recorded": 1}
    assert seen.total("sharded_counter.memcache.outages") == 1
    # Each write's one attempt failed (refused: nothing could have landed).
    assert seen.total("sharded_counter.retries") >= 2
    assert seen.total("sharded_counter.aborts") == 0
    # The stashed 5 is written to a shard by a fold once Datastore answers.
    Counter("otel-down").write_pending()
    assert seen.total("sharded_counter.stash.folds") == 1
    assert Counter("otel-down").get_count(nocache=True) == 5
    failed = [s for s in seen.spans.get_finished_spans() if not s.status.is_ok]
    assert failed, "a failed Datastore call shows as a span with an error status"


def test_the_prometheus_example_exports_the_increments(sharded_counter_env: dict[str, str]) -> None:
    """The docs' example, in a process of its own (it sets the global meter provider,
    which a process may set once), on a free port, then scraped over HTTP."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text(
        encoding="utf-8"
    )
    example = page.split("## A Prometheus endpoint", 1)[1].split("```python\n", 1)[1]
    source = example.split("```", 1)[0]
    expected = example.split("```text\n", 1)[1].split("```", 1)[0].strip()
    port = free_port()
    source = source.replace("start_http_server(9464)", f"start_http_server({port})")
    scrape = (
        "\nimport urllib.request\n"
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", source + scrape],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **sharded_counter_env},
    )
    assert done.returncode == 0, done.stderr
    # The page shows the line as a run printed it; only the version label moves.
    expected = re.sub(
        r'otel_scope_version="[^"]*"', f'otel_scope_version="{__version__}"', expected
    )
    assert expected in done.stdout.splitlines(), done.stdout[-2000:]

"""Developer sessions: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``, ``demo``, ``bench``.

The ``./dev`` script installs what a fresh machine lacks (memcached, nox)
and then runs one of these.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

SOURCES = ["sharded_counter", "emulator", "tests", "examples", "noxfile.py"]

#: The behaviour files that run a third time, on a Redis Cluster: the cache tier's
#: protocol and every pattern that lives in the cache. The rest of what reaches the
#: cache stops or relays one server (skipped on a cluster: one_cache_server) or is
#: about Datastore, which the first two runs cover.
CLUSTER_BEHAVIOUR = [
    "tests/test_counter.py",
    "tests/test_stash.py",
    "tests/test_idempotency.py",
    "tests/test_exactly_once.py",
    "tests/test_bounded.py",
    "tests/test_shared_buffer.py",
    "tests/test_ratelimit.py",
    "tests/test_lock.py",
    "tests/test_timeseries.py",
    "tests/test_hostile_values.py",
    "tests/test_aio.py",
    "tests/test_aio_patterns.py",
]


#: The behaviour files that run a fourth time, on the in-memory backends (memory://, both
#: engines' models): what an application's tests would do on them. Tests that need a
#: server process (to stop, relay or share) are skipped there (docs/testing.md).
MEMORY_BEHAVIOUR = [
    *CLUSTER_BEHAVIOUR,
    "tests/test_buffer.py",
    "tests/test_range.py",
    "tests/test_tokens.py",
    "tests/test_adaptive.py",
    "tests/test_batch_reads.py",
    "tests/test_error_matrix.py",
    "tests/test_bounds_guard.py",
    "tests/test_bounded_errors.py",
    "examples",
]


@nox.session
def tests(session: nox.Session) -> None:
    """Every test on both Datastore emulators with real memcached; then every test that
    reaches the cache again on Redis, the cache's behaviour files on a Redis Cluster, and
    the behaviour files on the in-memory backends.

    Which combinations run, and why (docs/cache-backends.md): the engines differ in how
    Datastore locks and aborts, which the memcached run covers on both; the cache kinds
    differ only below the cache's calls, which the conformance table holds to one
    meaning on all three. So the Redis and cluster runs use one engine, Firestore in
    Datastore mode, the one production runs.
    """
    # test brings the cli extra (the CLI is tested); bench: the bench's test draws its chart
    session.install(".[test,bench]")
    if session.posargs:
        session.run("pytest", *session.posargs)
        return
    session.run("pytest", "-q")
    firestore = ("--sc-engines", "firestore")
    session.run("pytest", "-q", "--sc-cache", "redis", *firestore)
    session.run("pytest", "-q", "--sc-cache", "redis-cluster", *firestore, *CLUSTER_BEHAVIOUR)
    session.run("pytest", "-q", "--sc-backend", "memory", *MEMORY_BEHAVIOUR)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: style, imports, common bugs."""
    session.install("ruff")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library, the emulator package and this file."""
    session.install(".[test,bench]", "mypy", "nox")
    session.run("mypy", "--strict")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (MkDocs) into site/; any warning fails the build."""
    session.install(".[docs,aio]")  # the reference reads sharded_counter.aio too
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Start the backends and hammer one hot counter: one entity versus sharded."""
    session.install(".[cli]")
    session.run("sharded-counter", "demo", *session.posargs)


@nox.session
def simulate(session: nox.Session) -> None:
    """Search the protocol in simulation (no backends): ``./dev simulate --minutes 10``."""
    session.install(".")
    session.run("python", "-m", "sharded_counter.tools.simulate", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Every way of counting side by side on both emulators: tables, bench.json, bench.png."""
    session.install(".[bench,redis]")  # redis: the bench measures Redis beside memcached
    session.run("sharded-counter", "bench", *session.posargs)

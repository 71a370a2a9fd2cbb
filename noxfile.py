"""Developer sessions: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``, ``demo``, ``bench``.

The ``./dev`` script installs what a fresh machine lacks (memcached, nox)
and then runs one of these.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

SOURCES = ["sharded_counter", "emulator", "tests", "noxfile.py"]

#: The behaviour tests that run a second time with Redis as the cache.
REDIS_BEHAVIOUR = [
    "tests/test_counter.py",
    "tests/test_stash.py",
    "tests/test_idempotency.py",
    "tests/test_shared_buffer.py",
    "tests/test_fork.py",
    "tests/test_ratelimit.py",
    "tests/test_lock.py",
]


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests, and behaviour tests on both Datastore emulators with real memcached."""
    # test brings the cli extra (the CLI is tested); bench: the bench's test draws its chart
    session.install(".[test,bench]")
    if session.posargs:
        session.run("pytest", *session.posargs)
        return
    session.run("pytest", "-q")
    # The counters' behaviour again with Redis as the cache (docs/cache-backends.md): the
    # files that exercise the cache tier's protocol; the rest of the suite is about
    # Datastore, memcached's own cluster, or the tools.
    session.run("pytest", "-q", "--sc-cache", "redis", *REDIS_BEHAVIOUR)


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
def bench(session: nox.Session) -> None:
    """Every way of counting side by side on both emulators: tables, bench.json, bench.png."""
    session.install(".[bench,redis]")  # redis: the bench measures Redis beside memcached
    session.run("sharded-counter", "bench", *session.posargs)

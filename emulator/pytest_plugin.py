"""pytest fixtures that run the real backends (registered as the ``sharded_counter`` plugin).

Importing this module starts nothing. A backend starts the first time a test asks for
it, at most once per run (a backend that a test killed is started again for the next
one), and everything stops when the session ends. A missing dependency fails the test
with a one-line message naming the install command; it never skips, so CI cannot go
green without having run against the backends.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import pytest

from .engines import ENGINES, Engine, check_engine
from .errors import BackendError
from .memcached import Memcached
from .redis_cluster import RedisCluster
from .redis_server import RedisServer
from .stack import BackendStack

_T = TypeVar("_T")

# Only this fixture's name decides what runs once per engine (sharded_counter_env asks
# for it). Every fixture of the plugin has a name of its own: the plugin is loaded into
# every project that installs the package, so a common name such as ``backend_env``
# would parametrize tests that another project wrote around a fixture of its own.
_ENGINE_FIXTURE = "sharded_counter_engine"
# Start-up failures seen this session, by backend: a second test must not wait through
# another 90 s timeout to learn the same thing.
_FAILURES = pytest.StashKey[dict[str, str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sharded-counter", "sharded-counter backends")
    group.addoption(
        "--sc-engines",
        default=",".join(ENGINES),
        metavar="ENGINES",
        help="comma-separated Datastore engines to run backend tests against "
        f"(default: {','.join(ENGINES)})",
    )
    group.addoption(
        "--sc-cache",
        default="memcached",
        choices=CACHES,
        help="the cache sharded_counter_env points counters at: memcached (MEMCACHED_HOSTS, "
        "the default), redis (SHARDED_COUNTER_CACHE_URL, a redis-server of the run's own) or "
        "redis-cluster (a 3+3 Redis Cluster of the run's own, as redis+cluster://); "
        "tests marked memcached_only are skipped under the others",
    )
    group.addoption(
        "--sc-backend",
        default="emulators",
        choices=("emulators", "memory"),
        help="what sharded_counter_env points counters at: the real emulators and cache "
        "(the default), or memory (this process's in-memory models, memory:// for the cache "
        "and for Datastore, each engine's model for that engine; tests marked "
        "needs_processes are skipped)",
    )
    group.addoption(
        "--sc-redis-server",
        default=None,
        metavar="PATH",
        help="the server binary for redis and redis-cluster (default: redis-server, else "
        "valkey-server); a valkey-server's URLs are valkey:// and valkey+cluster://",
    )


def _selected_engines(config: pytest.Config) -> tuple[Engine, ...]:
    raw = str(config.getoption("--sc-engines"))
    try:
        engines = tuple(dict.fromkeys(check_engine(e.strip()) for e in raw.split(",") if e.strip()))
    except ValueError as error:
        raise pytest.UsageError(f"--sc-engines: {error}") from None
    if not engines:
        raise pytest.UsageError(f"--sc-engines: no engine given (choose from {', '.join(ENGINES)})")
    return engines


#: The caches ``--sc-cache`` chooses from.
CACHES = ("memcached", "redis", "redis-cluster")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends: needs the real Datastore emulators and memcached")
    config.addinivalue_line(
        "markers",
        "memcached_only: looks at memcached itself (its connections, MEMCACHED_HOSTS): "
        "skipped when --sc-cache names another cache",
    )
    config.addinivalue_line(
        "markers",
        "one_cache_server: stops, restarts or relays the one cache server: skipped when "
        "--sc-cache names a cluster",
    )
    config.addinivalue_line(
        "markers",
        "needs_processes: needs the real backends (kills, restarts, relays or cannot reach "
        "one, shares it with another process, or needs its latency): skipped under "
        "--sc-backend memory",
    )
    # A typo in --sc-engines is a usage error up front, not a collection error per module.
    _selected_engines(config)


#: Fixtures that reach the cache ``--sc-cache`` names: a test without one of them runs
#: the same whatever the cache, so a run with another cache leaves it out.
CACHE_FIXTURES = frozenset(
    {"sharded_counter_env", "sharded_counter_aio_env", "sharded_counter_cache", "own_memcache"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--sc-backend") == "memory":
        _memory_only(config, items)
        return
    cache = str(config.getoption("--sc-cache"))
    if cache == "memcached":
        return
    # Under another cache only the tests that reach it run: the rest (units, memcached's
    # own cluster, the conformance table, which starts every kind itself) ran, or run,
    # in the memcached run and would only repeat it.
    kept = [item for item in items if CACHE_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if len(kept) < len(items):
        kept_ids = {id(item) for item in kept}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
        items[:] = kept
    skip = pytest.mark.skip(reason=f"looks at memcached itself; this run's cache is {cache}")
    one_server = pytest.mark.skip(
        reason="stops, restarts or relays one cache server; a cluster's own faults are "
        "tests/test_redis_cluster_faults.py's"
    )
    for item in items:
        if item.get_closest_marker("memcached_only") is not None:
            item.add_marker(skip)
        elif cache == "redis-cluster" and item.get_closest_marker("one_cache_server"):
            item.add_marker(one_server)


def _memory_only(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--sc-backend memory``: only the tests that reach the backends through
    ``sharded_counter_env`` (or its asyncio twin) run, less those that need a server
    process (they ask for one, or are marked ``needs_processes``)."""
    envs = {"sharded_counter_env", "sharded_counter_aio_env"}
    kept = [item for item in items if envs & set(getattr(item, "fixturenames", ()))]
    if len(kept) < len(items):
        kept_ids = {id(item) for item in kept}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
        items[:] = kept
    skip = pytest.mark.skip(reason="needs real backend processes; this run is --sc-backend memory")
    for item in items:
        reaches_a_server = _SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
        marked = item.get_closest_marker("needs_processes") or item.get_closest_marker(
            "memcached_only"
        )
        if reaches_a_server or marked:
            item.add_marker(skip)


#: Fixtures that hand a test a server process (to stop, relay or reach directly), which a
#: run on the in-memory backends has not got.
_SERVER_FIXTURES = frozenset(
    {
        "sharded_counter_cache",
        "sharded_counter_memcached",
        "sharded_counter_backends",
        "sharded_counter_redis",
        "sharded_counter_redis_cluster",
        "own_memcache",
    }
)


def _parametrizes(marker: pytest.Mark, argname: str) -> bool:
    names = marker.args[0] if marker.args else marker.kwargs.get("argnames", ())
    if isinstance(names, str):
        names = names.split(",")
    return argname in (str(name).strip() for name in names)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if _ENGINE_FIXTURE not in metafunc.fixturenames:
        return
    # A test that picks its engines itself keeps its choice.
    markers = metafunc.definition.iter_markers("parametrize")
    if any(_parametrizes(marker, _ENGINE_FIXTURE) for marker in markers):
        return
    engines = _selected_engines(metafunc.config)
    metafunc.parametrize(_ENGINE_FIXTURE, engines, ids=list(engines), indirect=True)


def _start_once(config: pytest.Config, key: str, start: Callable[[], _T]) -> _T:
    """Run ``start``; on a BackendError fail this and every later test asking for ``key``."""
    failures = config.stash.setdefault(_FAILURES, {})
    if key in failures:
        pytest.fail(failures[key], pytrace=False)
    try:
        return start()
    except BackendError as error:
        failures[key] = str(error)
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def sharded_counter_backends(pytestconfig: pytest.Config) -> Iterator[BackendStack]:
    """The session's BackendStack: memcached runs; each engine starts on first use.

    It holds every engine, not only those of --sc-engines: that option picks what tests
    are parametrized over, while a test that names its engine explicitly still gets it.
    """
    stack = BackendStack(ENGINES, memcached=1)
    try:
        _start_once(pytestconfig, "memcached", lambda: stack.memcached)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def sharded_counter_memcached(
    pytestconfig: pytest.Config, sharded_counter_backends: BackendStack
) -> Memcached:
    """The session's memcached server."""
    return _start_once(pytestconfig, "memcached", lambda: sharded_counter_backends.memcached[0])


@pytest.fixture(scope="session")
def sharded_counter_redis(pytestconfig: pytest.Config) -> Iterator[RedisServer]:
    """A redis-server of the run's own, started on first use (``--sc-cache redis`` points
    ``sharded_counter_env`` at it; tests of the cache itself may ask for it directly)."""
    server = RedisServer(binary=pytestconfig.getoption("--sc-redis-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sharded_counter_redis_cluster(pytestconfig: pytest.Config) -> Iterator[RedisCluster]:
    """A Redis Cluster of the run's own (3 primaries, 3 replicas), started on first use
    (``--sc-cache redis-cluster`` points ``sharded_counter_env`` at it)."""
    cluster = RedisCluster(binary=pytestconfig.getoption("--sc-redis-server")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def sharded_counter_cache(request: pytest.FixtureRequest) -> Memcached | RedisServer | RedisCluster:
    """The cache ``--sc-cache`` names, the one ``sharded_counter_env`` points at: for
    tests that flush, kill, pause or restart the cache, or reach it through a relay.
    Each has ``url`` and ``flush_all``; a server (not a cluster) also ``host``,
    ``port``, ``kill``, ``pause``, ``resume`` and ``restart``."""
    cache = str(request.config.getoption("--sc-cache"))
    if cache == "memcached":
        server: Memcached = request.getfixturevalue("sharded_counter_memcached")
        return server
    fixture = "sharded_counter_redis" if cache == "redis" else "sharded_counter_redis_cluster"
    found: RedisServer | RedisCluster = _start_once(
        request.config, cache, lambda: request.getfixturevalue(fixture)
    )
    return found


@pytest.fixture
def sharded_counter_engine(request: pytest.FixtureRequest) -> Engine:
    """The engine this test runs against (tests using it run once per selected engine)."""
    param = getattr(request, "param", None)
    if param is None:
        # Reached through request.getfixturevalue, where no parametrization applies.
        return _selected_engines(request.config)[0]
    return check_engine(str(param))


@pytest.fixture
def sharded_counter_env(
    request: pytest.FixtureRequest,
    sharded_counter_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """Point this test at clean backends: emulator and memcached emptied, env set.

    Sets DATASTORE_* (as ``gcloud beta emulators datastore env-init`` prints them) and
    MEMCACHED_HOSTS in os.environ for the test's duration, and returns them. Calls
    ``sharded_counter.reconnect()``, so counters made earlier (a module-level one in the
    app under test) connect to these backends on their next call.
    """
    if request.config.getoption("--sc-backend") == "memory":
        return _memory_env(sharded_counter_engine, monkeypatch)
    stack: BackendStack = request.getfixturevalue("sharded_counter_backends")
    emulator = _start_once(
        request.config,
        f"engine:{sharded_counter_engine}",
        functools.partial(stack.emulator, sharded_counter_engine),
    )
    servers = _start_once(request.config, "memcached", lambda: stack.memcached)
    # Clean before the test rather than after, so a test sees a clean slate even when
    # the one before it crashed half-way.
    emulator.reset()
    for server in servers:
        server.flush_all()
    env = stack.env(sharded_counter_engine)
    cache = request.config.getoption("--sc-cache")
    if cache in ("redis", "redis-cluster"):
        fixture = "sharded_counter_redis" if cache == "redis" else "sharded_counter_redis_cluster"
        redis = _start_once(request.config, cache, lambda: request.getfixturevalue(fixture))
        redis.flush_all()
        env.update(redis.env())
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # Counters made before (at import, in a module-level fixture) connect afresh on their
    # next call, to these backends.
    from sharded_counter import reconnect

    reconnect()
    return env


#: The environment that puts counters on this process's in-memory backends.
_MEMORY_ENV_NAMES = ("SHARDED_COUNTER_CACHE_URL", "SHARDED_COUNTER_DATASTORE_URL")
#: What would name another backend, and is unset for them.
_OTHER_BACKENDS = ("MEMCACHED_HOSTS", "DATASTORE_EMULATOR_HOST", "SHARDED_COUNTER_CACHE_CA_FILE")


def _memory_env(engine: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this test at empty in-memory backends (memory/backends.py): Datastore of
    ``engine``'s model, the cache ``memory://``; env set as ``sharded_counter_env``'s."""
    from sharded_counter import reconnect
    from sharded_counter.memory.backends import reset_memory

    for name in _OTHER_BACKENDS:
        monkeypatch.delenv(name, raising=False)
    env = dict(zip(_MEMORY_ENV_NAMES, ("memory://", f"memory://{engine}"), strict=True))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_memory()
    reconnect()
    return env


@pytest.fixture
def sharded_counter_memory_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this test at this process's in-memory backends, whatever the run's options:
    ``memory://`` as the cache and as Datastore (Firestore in Datastore mode's model),
    both empty. Needs no Java, emulator or memcached. Sets
    ``SHARDED_COUNTER_CACHE_URL`` and ``SHARDED_COUNTER_DATASTORE_URL`` for the test's
    duration (and unsets ``MEMCACHED_HOSTS`` and ``DATASTORE_EMULATOR_HOST``), calls
    ``sharded_counter.reconnect()``, and returns what it set. Not a production backend:
    see docs/testing.md for what it does not model."""
    return _memory_env("firestore", monkeypatch)


# Async tests: pytest-asyncio runs async fixtures in the test's own event loop. Without
# it the fixture below does not exist (a test asking for it says so by name).
if importlib.util.find_spec("pytest_asyncio") is not None:
    import pytest_asyncio

    @pytest_asyncio.fixture
    async def sharded_counter_aio_env(
        sharded_counter_env: dict[str, str],
    ) -> AsyncIterator[dict[str, str]]:
        """``sharded_counter_env`` for async tests (pytest-asyncio): once per engine, env
        set, backends wiped; afterwards the test loop's channels and memcache
        connections of ``sharded_counter.aio`` are closed (``aclose``)."""
        yield sharded_counter_env
        from sharded_counter.aio import aclose  # needs the aio extra, as the test does

        await aclose()

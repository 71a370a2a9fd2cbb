"""The cache chosen by URL: what parses, to what, and what is refused with which reason.

Mostly pure parsing, with no server: the property tests build URLs from their parts
and check that the parts come back; the table of bad URLs checks that each is
refused by the settings with a ``ConfigurationError`` naming what is wrong. At the
end, a counter and a rate limiter on a real redis-server that a URL names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharded_counter import Counter, RateLimiter, config, reconnect
from sharded_counter.aio.backend import async_cache
from sharded_counter.aio.redis_cluster import AsyncRedisClusterCache
from sharded_counter.cache.by_url import connect_cache, memcached_servers, redis_client_for
from sharded_counter.cache.redis.client import RedisClient
from sharded_counter.cache.redis.cluster import RedisClusterClient
from sharded_counter.core.cache_url import (
    DEFAULT_PORTS,
    SCHEMES,
    BadCacheUrl,
    CacheUrl,
    parse_cache_url,
)
from sharded_counter.errors import ConfigurationError
from sharded_counter.memory.backends import memory_cache
from sharded_counter.settings import Settings, resolve
from sharded_counter_emulator.redis_server import RedisServer

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_NAMES = st.lists(_LABEL, min_size=1, max_size=3).map(".".join)
_IPV4 = st.ip_addresses(v=4).map(str)
_IPV6 = st.ip_addresses(v=6).map(str)
_HOSTS = st.one_of(_NAMES, _IPV4, _IPV6)
_PORTS = st.integers(min_value=1, max_value=65535)
_SECRETS = st.text(min_size=1, max_size=20)


def _netloc(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


@given(
    scheme=st.sampled_from(["redis", "rediss", "valkey", "valkeys"]),
    host=_HOSTS,
    port=st.none() | _PORTS,
    db=st.none() | st.integers(min_value=0, max_value=2**31 - 1),
    user=st.none() | _SECRETS,
    password=st.none() | _SECRETS,
)
def test_single_server_urls_give_back_their_parts(
    scheme: str,
    host: str,
    port: int | None,
    db: int | None,
    user: str | None,
    password: str | None,
) -> None:
    auth = ""
    if password is not None:
        auth = f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
    path = "" if db is None else f"/{db}"
    url = parse_cache_url(f"{scheme}://{auth}{_netloc(host, port)}{path}")
    family, tls, cluster = SCHEMES[scheme]
    assert url == CacheUrl(
        scheme=scheme,
        family=family,
        hosts=((host, DEFAULT_PORTS[family] if port is None else port),),
        tls=tls,
        cluster=cluster,
        username=(user or None) if password is not None else None,
        password=password,
        db=db or 0,
    )
    assert url.redis_protocol
    # The redacted form reads back as the same URL with the password replaced.
    shown = parse_cache_url(url.redacted())
    assert shown == dataclasses.replace(url, password=None if password is None else "***")


@given(
    scheme=st.sampled_from(
        ["memcached", "redis+cluster", "rediss+cluster", "valkey+cluster", "valkeys+cluster"]
    ),
    servers=st.lists(st.tuples(_HOSTS, st.none() | _PORTS), min_size=1, max_size=5),
)
def test_host_lists_keep_their_order(scheme: str, servers: list[tuple[str, int | None]]) -> None:
    url = parse_cache_url(f"{scheme}://" + ",".join(_netloc(h, p) for h, p in servers))
    default = DEFAULT_PORTS[url.family]
    assert url.hosts == tuple((h, default if p is None else p) for h, p in servers)
    assert url.cluster == scheme.endswith("+cluster")
    assert url.redis_protocol == (scheme != "memcached")
    assert parse_cache_url(url.redacted()) == url  # no password: the same URL


@given(st.text(max_size=40))
def test_any_text_parses_or_is_refused_as_bad_input(text: str) -> None:
    try:
        url = parse_cache_url(text)
    except BadCacheUrl as refused:
        assert isinstance(refused, ValueError) and str(refused)
    else:
        assert url.hosts and all(0 < port < 65536 for _, port in url.hosts)


def test_a_password_is_percent_decoded_and_never_shown() -> None:
    url = parse_cache_url("rediss://app:p%40ss%2Fw%3Ard@cache.internal:6380/2")
    assert (url.username, url.password, url.db, url.tls) == ("app", "p@ss/w:rd", 2, True)
    assert url.hosts == (("cache.internal", 6380),)
    assert "p@ss" not in repr(url) and "p%40ss" not in url.redacted()
    assert url.redacted() == "rediss://app:***@cache.internal:6380/2"


# (URL, a word the refusal must contain: it names what is wrong)
BAD_URLS = [
    ("cache.internal:6379", "scheme"),
    ("http://cache:80", "scheme"),
    ("redis+sentinel://h:1", "scheme"),
    ("redis://", "no host"),
    ("redis://:pw@", "no host"),
    ("redis://:6379", "empty host"),
    ("memcached://h1:11211,,h2:11211", "empty host"),
    ("redis://h:0", "port"),
    ("redis://h:65536", "port"),
    ("redis://h:63a9", "port"),
    ("redis://h:", "port"),
    ("redis://h:-1", "port"),
    ("redis://h:\uff16\uff13\uff17\uff19", "port"),  # full-width digits: str.isdigit says yes
    ("redis://h/x", "db"),
    ("redis://h/-1", "db"),
    ("redis://h/1/2", "db"),
    ("redis://h/2147483648", "db"),
    ("redis+cluster://h1:1,h2:2/3", "db 0"),
    ("memcached://h:11211/0", "path"),
    ("memcached://u:p@h:11211", "password"),
    ("redis://secret@h:6379", "':'"),
    ("redis://user:@h:6379", "empty password"),
    ("redis://h1:6379,h2:6379", "one host"),
    ("valkeys://h1,h2", "one host"),
    ("redis://h:6379?ssl_cert_reqs=none", "query string"),
    ("redis://h:6379#top", "fragment"),
    ("redis://[::1:6379", "'['"),
    ("redis://[nothost]:6379", "IPv6"),
    ("redis://[::1]6379", "after its ']'"),
    ("redis://ho st:6379", "host"),
    ("redis://h@st:6379", "':'"),
    ("redis://hö.st:6379", "host"),
]


@pytest.mark.parametrize(("text", "reason"), BAD_URLS)
def test_bad_urls_are_refused_naming_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(BadCacheUrl, match=None) as refused:
        parse_cache_url(text)
    assert reason in str(refused.value)
    with pytest.raises(ConfigurationError) as configured:
        resolve({"cache_url": text})
    assert reason in str(configured.value) and str(configured.value).startswith("cache_url: ")


@pytest.mark.parametrize(
    "text",
    [
        "redis://u:hunter2@h:6379?x=1",
        "redis://u:hun/ter2@h:6379",
        "redis://u:hunter2@h:0",
        "redis://u:hun?ter2@h:6379",
        "redis://u:hun#ter2@h:6379",
        "memcached://u:hunter2@h",
    ],
)
def test_a_refusal_never_repeats_a_password(text: str) -> None:
    with pytest.raises(BadCacheUrl) as refused:
        parse_cache_url(text)
    assert "hunter2" not in str(refused.value) and "ter2" not in str(refused.value)


def test_a_counter_with_a_bad_url_is_refused_when_made() -> None:
    with pytest.raises(ConfigurationError, match="port"):
        Counter("hits", cache_url="redis://h:0")


def test_the_setting_comes_from_the_environment_and_memcached_hosts_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMCACHED_HOSTS", "127.0.0.1:11211")
    monkeypatch.delenv("SHARDED_COUNTER_CACHE_URL", raising=False)
    assert resolve().cache_url is None
    assert resolve().memcached_hosts == ("127.0.0.1:11211",)
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", " redis://127.0.0.1:6379/1 ")
    settings = resolve()
    assert settings.cache_url == "redis://127.0.0.1:6379/1"
    assert settings.memcached_hosts == ("127.0.0.1:11211",)
    assert resolve({"cache_url": "valkey://v:6379"}).cache_url == "valkey://v:6379"
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", "redis://h:99999")
    with pytest.raises(ConfigurationError, match="port"):
        resolve()


def test_a_non_string_setting_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="must be a str"):
        resolve({"cache_url": 6379})


# -- the client a URL names (by_url.py): nothing connects until a call --------------------


def test_a_redis_url_names_a_redis_client_with_its_parts() -> None:
    settings = Settings(cache_url="valkeys://:pw@cache.internal:6380/4", memcache_timeout=0.2)
    client = redis_client_for(settings)
    assert isinstance(client, RedisClient)
    assert client.address == ("cache.internal", 6380)
    kwargs = client._pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (4, "pw", 0.2)
    assert client._pool.connection_class.__name__ == "SSLConnection"
    assert memcached_servers(settings) == []


def test_memcached_hosts_decide_when_no_url_is_set_and_a_memcached_url_wins() -> None:
    hosts = Settings(memcached_hosts=("10.0.0.1:11211",))
    assert redis_client_for(hosts) is None
    assert memcached_servers(hosts) == [("10.0.0.1", 11211)]
    both = Settings(memcached_hosts=("10.0.0.1:11211",), cache_url="memcached://a,[::1]:9")
    assert redis_client_for(both) is None
    assert memcached_servers(both) == [("a", 11211), ("::1", 9)]


@pytest.mark.parametrize("scheme", ["redis+cluster", "valkey+cluster"])
def test_a_cluster_url_names_a_cluster_client_with_its_seeds(scheme: str) -> None:
    settings = Settings(
        cache_url=f"{scheme}://app:pw@h1:7000,h2",
        memcache_timeout=0.2,
        memcache_connect_timeout=0.1,
    )
    client = redis_client_for(settings)
    assert isinstance(client, RedisClusterClient)
    assert client.seeds == [("h1", 7000), ("h2", 6379)]
    options = client._options
    assert (options["username"], options["password"]) == ("app", "pw")
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == (0.2, 0.1)
    assert "ssl" not in options
    assert memcached_servers(settings) == []


@pytest.mark.parametrize("scheme", ["rediss+cluster", "valkeys+cluster"])
def test_a_tls_cluster_url_checks_certificates_against_cache_ca_file(
    scheme: str, tmp_path: Path
) -> None:
    ca = tmp_path / "server-ca.pem"
    ca.write_text("a CA bundle\n")
    client = redis_client_for(Settings(cache_url=f"{scheme}://:pw@h1:6379", cache_ca_file=str(ca)))
    assert isinstance(client, RedisClusterClient)
    assert (client._options["ssl"], client._options["ssl_ca_certs"]) == (True, str(ca))
    missing = Settings(cache_url=f"{scheme}://h1", cache_ca_file=str(tmp_path / "none.pem"))
    with pytest.raises(ConfigurationError, match="cannot be read"):
        redis_client_for(missing)


def test_the_env_command_shows_the_url_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from sharded_counter.tools.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", "rediss://app:hunter2@cache:6380/1")
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    line = next(line for line in result.output.splitlines() if "cache_url" in line)
    assert "rediss://app:***@cache:6380/1" in line and "SHARDED_COUNTER_CACHE_URL" in line


# -- which place names the cache, and a counter on the server a URL names ------------------


def test_the_place_that_names_a_cache_last_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("MEMCACHED_HOSTS", "127.0.0.1:11211")
    assert resolve().cache_url == "redis://127.0.0.1:6379/0"  # one place, both: the URL
    explicit = resolve({"memcached_hosts": ["127.0.0.1:11311"]})
    assert (explicit.cache_url, explicit.memcached_hosts) == (None, ("127.0.0.1:11311",))
    config["sharded_counter"] = {"memcached_hosts": ["127.0.0.1:11411"]}
    try:
        assert resolve().cache_url is None  # config in code sits above the environment
        assert resolve({"cache_url": "valkey://v:1"}).cache_url == "valkey://v:1"
    finally:
        config.clear()


@pytest.mark.backends
def test_a_counter_and_a_rate_limiter_run_on_the_redis_a_url_names(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer().start()
    try:
        monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", f"redis://{server.host}:{server.port}/0")
        reconnect()
        hits = Counter("on-redis")
        for delta in (1, 2, 3):
            hits.increment(delta)
        assert (hits.count, hits.get_count(nocache=True)) == (6, 6)
        assert isinstance(hits._backend.cache._calls.client, RedisClient)
        limiter = RateLimiter("2/minute")
        assert [limiter.hit("k").allowed for _ in range(3)] == [True, True, False]
        # Kept there, not in the session's memcached: the record is the Redis server's.
        assert RedisClient(server.host, server.port).get(hits._record_key) is not None
    finally:
        server.stop()
        reconnect()


def test_asyncio_takes_a_cluster_url_to_its_cluster_cache() -> None:
    """Nothing connects until the first call: the URL's nodes are the seeds."""
    url = "redis+cluster://127.0.0.1:7001,127.0.0.1:7002"
    cache = async_cache(Settings(cache_url=url), outage=None)
    assert isinstance(cache, AsyncRedisClusterCache)
    assert cache.seeds == [("127.0.0.1", 7001), ("127.0.0.1", 7002)]


@pytest.mark.parametrize(
    ("text", "name"), [("memory://", ""), ("memory://tests-1.a_b", "tests-1.a_b")]
)
def test_a_memory_url_names_one_of_the_process_caches(text: str, name: str) -> None:
    url = parse_cache_url(text)
    assert (url.family, url.name, url.hosts, url.redis_protocol) == ("memory", name, (), False)
    assert url.redacted() == text
    assert connect_cache(Settings(cache_url=text)) is memory_cache(name)
    assert memcached_servers(Settings(cache_url=text)) == []


@pytest.mark.parametrize("text", ["memory://a/b", "memory://a b", "memory://x@y", "memory://é"])
def test_a_memory_url_takes_a_plain_name_only(text: str) -> None:
    with pytest.raises(BadCacheUrl, match="memory:// takes only a name"):
        parse_cache_url(text)

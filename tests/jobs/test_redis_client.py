"""JOBS_REDIS_URL may name a Redis behind Sentinel (jobs/redis_client.py): the factory, beat's
lock and the ledger's client reach the current master through a real sentinel started here."""

from __future__ import annotations

import subprocess
import time

import pytest
import redis

from devtools.localredis import LocalRedis, free_port, redis_server_binary
from jobs.redis_client import SentinelURL, kombu_sentinel, parse_sentinel_url, redis_client


class LocalSentinel:
    """A `redis-server --sentinel` child process on a free port, watching `master` as `mymaster`."""

    def __init__(self, master: LocalRedis, directory, *, down_after_ms: int = 60_000) -> None:
        self.port = free_port()
        self.master = master
        self.config = directory / "sentinel.conf"  # sentinel rewrites it: a file of its own
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds mymaster {down_after_ms}\n"
        )
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> LocalSentinel:
        self.process = subprocess.Popen(
            [redis_server_binary(), str(self.config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "redis-server --sentinel exited at start"
            try:
                if client.sentinel_get_master_addr_by_name("mymaster"):
                    return self
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the sentinel did not answer on port {self.port} within {timeout} s")

    def url(self, rest: str = "/mymaster", userinfo: str = "") -> str:
        return f"sentinel://{userinfo}127.0.0.1:{self.port}{rest}"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - sentinel stops at once
                self.process.kill()
                self.process.wait()


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for: {what}"
        time.sleep(0.05)


@pytest.fixture
def sentinel(tmp_path):
    """A master and a sentinel of its own, both stopped after the test."""
    master = LocalRedis().start()
    watcher = LocalSentinel(master, tmp_path)
    try:
        yield watcher.start()
    finally:
        watcher.stop()
        master.stop()


def test_the_factory_reaches_the_master_through_a_sentinel(sentinel):
    master = redis.Redis(port=sentinel.master.port, db=3)
    # The first sentinel listed does not answer: the next one is asked.
    client = redis_client(f"sentinel://127.0.0.1:{free_port()},127.0.0.1:{sentinel.port}/mymaster/3", timeout=1)
    assert client.set("jobs:test", "through sentinel")
    assert master.get("jobs:test") == b"through sentinel"
    assert client.info("server")["process_id"] == sentinel.master.process.pid

    # The password is the master's (the sentinel has none here).
    master.config_set("requirepass", "s3cr:t")
    assert redis_client(sentinel.url(userinfo=":s3cr%3At@")).ping()
    with pytest.raises(redis.AuthenticationError):
        redis_client(sentinel.url()).ping()


def test_beats_lock_and_the_ledger_work_through_a_sentinel(sentinel, settings):
    from jobs.conf import jobs_settings
    from jobs.runtime import beat, ledger

    settings.JOBS_REDIS_URL = sentinel.url("/mymaster/2")
    master = redis.Redis(port=sentinel.master.port, db=2)

    first = beat.BeatLock(jobs_settings.redis_url, ttl=5)
    second = beat.BeatLock(jobs_settings.redis_url, ttl=5)
    assert first.acquire_or_renew()
    assert not second.acquire_or_renew()
    assert master.get(beat.LOCK_KEY).decode() == first.token
    assert second.holder() == first.token
    first.release()
    assert not master.exists(beat.LOCK_KEY)
    assert second.acquire_or_renew()

    ledger.worker_reserved_publish("worker-1", ["task-a"])
    assert master.hexists(ledger.RESERVED_KEY, "worker-1")
    assert ledger.workers_reserved_ids() == {"task-a"}


def test_the_sites_cache_works_through_a_sentinel(sentinel):
    """REDIS_URL=sentinel://... (config/cache.py): the whole URL, commas and all, reaches the
    master the sentinel names."""
    from config.cache import SentinelRedisCache

    cache = SentinelRedisCache(sentinel.url("/mymaster/5"), {"OPTIONS": {"socket_timeout": 1}, "KEY_PREFIX": "t"})
    cache.set("greeting", {"hello": "sentinel"}, timeout=60)
    assert cache.get("greeting") == {"hello": "sentinel"}
    assert redis.Redis(port=sentinel.master.port, db=5).exists(cache.make_key("greeting"))
    listed_twice = f"sentinel://127.0.0.1:{free_port()},127.0.0.1:{sentinel.port}/mymaster/5"
    assert SentinelRedisCache(listed_twice, {"KEY_PREFIX": "t"}).get("greeting") == {"hello": "sentinel"}


@pytest.mark.django_db(transaction=True)  # django-celery-beat commits and closes connections
def test_beat_leads_through_a_sentinel(sentinel, settings, redis_client):
    from celery import current_app

    from jobs.runtime import beat

    settings.JOBS_REDIS_URL = sentinel.url()
    scheduler = beat.LockedDatabaseScheduler(app=current_app, lazy=True)
    try:
        assert scheduler.tick() != beat.RETRY_AFTER_ERROR
        assert scheduler.lock.held
        assert redis.Redis(port=sentinel.master.port).get(beat.LOCK_KEY).decode() == scheduler.lock.token
    finally:
        scheduler.close()


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("sentinel://s1/mymaster", SentinelURL([("s1", 26379)], "mymaster", 0, None, None, None)),
        (
            "sentinel://:p%40ss@s1:26380,s2:26381/main/4?sentinel_password=sp",
            SentinelURL([("s1", 26380), ("s2", 26381)], "main", 4, None, "p@ss", "sp"),
        ),
        ("sentinel://user:pw@[::1]:26379/m/", SentinelURL([("::1", 26379)], "m", 0, "user", "pw", None)),
    ],
)
def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database(url, parsed):
    assert parse_sentinel_url(url) == parsed


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("sentinel://s1:26379", "names its master"),
        ("sentinel://s1:26379;sentinel://s2:26379", "names its master"),  # kombu's broker form
        ("sentinel:///mymaster", "no sentinel host"),
        ("sentinel://s1:port/mymaster", "port is a number"),
        ("sentinel://s1/mymaster/two", "database is a number"),
        ("sentinel://s1/a/1/b", r"/<master_name>\[/<db>\]"),
    ],
)
def test_a_sentinel_url_that_names_no_master_is_refused_with_the_form(url, error):
    with pytest.raises(ValueError, match=error):
        parse_sentinel_url(url)


@pytest.mark.parametrize(
    ("url", "broker", "options"),
    [
        ("sentinel://s1,s2:26380/jobs", "sentinel://s1:26379/0;sentinel://s2:26380/0", {"master_name": "jobs"}),
        (
            "sentinel://:p%40ss@s1/main/4?sentinel_password=sp",
            "sentinel://:p%40ss@s1:26379/4",
            {"master_name": "main", "sentinel_kwargs": {"password": "sp"}},
        ),
        ("sentinel://[::1]:26379/m", "sentinel://[::1]:26379/0", {"master_name": "m"}),
    ],
)
def test_one_sentinel_url_becomes_kombus_broker_url_and_options(url, broker, options):
    from kombu.utils.url import parse_url

    made, made_options = kombu_sentinel(url, timeout=0.5)
    sentinel_kwargs = made_options.pop("sentinel_kwargs")
    assert (made, made_options) == (broker, {"master_name": options["master_name"]})
    # A sentinel that does not answer costs half a second, once: the next one is asked.
    assert sentinel_kwargs.pop("retry").get_retries() == 0
    expected = {"socket_connect_timeout": 0.5, "socket_timeout": 0.5, "socket_keepalive": True}
    assert sentinel_kwargs == {**expected, **options.get("sentinel_kwargs", {})}
    # kombu reads back what was meant: the password decoded, the database kept.
    first = parse_url(broker.split(";")[0])
    assert (first["password"], first["virtual_host"]) == (
        parse_sentinel_url(url).password,
        str(parse_sentinel_url(url).db),
    )


def test_a_plain_url_is_redis_pys(redis_server):
    client = redis_client(redis_server.url, timeout=0.5)
    assert client.ping()
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.5


def test_after_a_failover_the_same_client_reaches_the_new_master(tmp_path):
    """The master dies, the sentinel promotes its replica: the client made before asks the
    sentinel again on its next connection, and writes to the new master."""
    master, replica = LocalRedis().start(), LocalRedis().start()
    watcher = None
    try:
        redis.Redis(port=master.port).config_set("repl-diskless-sync-delay", 0)  # not 5 s
        replica_client = redis.Redis(port=replica.port, socket_timeout=1)
        replica_client.replicaof("127.0.0.1", master.port)
        wait_until(lambda: replica_client.info("replication").get("master_link_status") == "up", "the replica syncs")
        watcher = LocalSentinel(master, tmp_path, down_after_ms=300).start()  # finds the replica in INFO
        sentinel_client = redis.Redis(port=watcher.port, socket_timeout=1)
        wait_until(lambda: sentinel_client.sentinel_slaves("mymaster"), "the sentinel sees the replica")
        client = redis_client(watcher.url(), timeout=1)
        client.set("jobs:test", "before")
        assert client.info("server")["process_id"] == master.process.pid

        master.stop()
        wait_until(
            lambda: sentinel_client.sentinel_get_master_addr_by_name("mymaster")[1] == replica.port,
            "the sentinel promotes the replica",
        )

        def written() -> bool:
            try:
                client.set("jobs:test", "after")
            except redis.ConnectionError:
                return False
            return True

        wait_until(written, "the same client writes to the new master")
        assert client.info("server")["process_id"] == replica.process.pid
        assert replica_client.get("jobs:test") == b"after"
    finally:
        if watcher:
            watcher.stop()
        replica.stop()
        master.stop()

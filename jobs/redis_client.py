"""The one way `jobs` opens its Redis (`JOBS_REDIS_URL`: beat's lock, the ledger's view of the
broker, the workers' reserved tasks), so that it may sit behind Redis Sentinel.

A plain URL (`redis://`, `rediss://`, `unix://`) is redis-py's `Redis.from_url`. A Sentinel URL
names the sentinels and the master they watch:

    sentinel://[[user]:password@]host1:26379[,host2:26380,...]/<master_name>[/<db>][?sentinel_password=...]

- the hosts are the sentinels (port 26379 when left out; an IPv6 address in brackets);
- the user and password are the master's (percent-encoded), not the sentinels';
- `sentinel_password` is the sentinels' own (`requirepass` in sentinel.conf), when they have one;
- `<db>` is the database number on the master (0 when left out).

The client asks a sentinel for the current master on each new connection, so after a failover
it reaches the new master once the old connections fail. Kombu's own form for a Sentinel
*broker* (`sentinel://host:26379;sentinel://host2:26379`, the master's name in the transport
options) names no master, so it is refused here with a message saying so; `kombu_sentinel()`
turns this form into kombu's, so that one URL can name the broker too.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from jobs.conf import jobs_settings

SENTINEL_PORT = 26379
_NO_MASTER = (
    "a sentinel:// URL names its master: sentinel://host1:26379,host2:26379/<master_name>"
    " (kombu's form for a Sentinel broker, with the master in the transport options, is not taken)"
)


class SentinelURL(NamedTuple):
    sentinels: list[tuple[str, int]]
    master: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None


def redis_client(url: str | None = None, *, timeout: float = 1.0) -> redis.Redis:
    """A client of `url` (by default `jobs_settings.redis_url`, read now), whose connects and
    commands give up after `timeout` seconds: `jobs` asks Redis on its hot paths and treats a
    Redis that does not answer as an error to handle, not as a wait."""
    if url is None:
        url = jobs_settings.redis_url
    if urlsplit(url).scheme != "sentinel":
        return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    parsed = parse_sentinel_url(url)
    socket_options = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis.sentinel has no annotations
        parsed.sentinels,
        # No retries against one sentinel (redis-py's default retries cost ~4 s): the next one
        # listed is asked instead.
        sentinel_kwargs={**socket_options, "password": parsed.sentinel_password, "retry": Retry(NoBackoff(), 0)},
        **socket_options,
    )
    master = sentinel.master_for(  # type: ignore[no-untyped-call]
        parsed.master, db=parsed.db, username=parsed.username, password=parsed.password
    )
    return cast("redis.Redis", master)


def kombu_sentinel(url: str, *, timeout: float = 1.0) -> tuple[str, dict[str, Any]]:
    """A Celery broker behind Sentinel, from a `sentinel://` URL of the form above: kombu's URL
    (one `sentinel://` per sentinel, joined by `;`) and the transport options it needs beside
    its own: `master_name`, and `sentinel_kwargs` for the connections to the sentinels. Those
    give up on a sentinel after `timeout` seconds, without retries, and ask the next one: kombu
    would give them redis-py's default retries (10, with backoff), and a worker whose first
    sentinel's host is gone then froze its event loop for a minute on every new connection
    (tests/cluster/test_sentinel.py). ValueError as `parse_sentinel_url`."""
    parsed = parse_sentinel_url(url)
    auth = ""
    if parsed.username or parsed.password:
        auth = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password or '', safe='')}@"
    hosts = [f"[{host}]" if ":" in host else host for host, _port in parsed.sentinels]
    broker = ";".join(
        f"sentinel://{auth}{host}:{port}/{parsed.db}"
        for host, (_host, port) in zip(hosts, parsed.sentinels, strict=True)
    )
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    sentinel_kwargs["socket_keepalive"] = True  # a sentinel's host gone: its pooled connection found dead
    sentinel_kwargs["retry"] = Retry(NoBackoff(), 0)
    if parsed.sentinel_password:
        sentinel_kwargs["password"] = parsed.sentinel_password
    return broker, {"master_name": parsed.master, "sentinel_kwargs": sentinel_kwargs}


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a `sentinel://` URL (see the module's docstring); ValueError naming what is
    wrong, never echoing the password."""
    parts = urlsplit(url)
    if parts.scheme != "sentinel":
        raise ValueError("not a sentinel:// URL")
    if ";" in url:
        raise ValueError(_NO_MASTER)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = [_host_port(host) for host in hosts.split(",") if host.strip()]
    if not sentinels:
        raise ValueError("a sentinel:// URL names no sentinel host: sentinel://host:26379/<master_name>")
    path = [part for part in parts.path.split("/") if part]
    if not path:
        raise ValueError(_NO_MASTER)
    if len(path) > 2:
        raise ValueError("a sentinel:// URL's path is /<master_name>[/<db>]")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError(f"a sentinel:// URL's database is a number, not {path[1]!r}") from None
    query = parse_qs(parts.query)
    sentinel_password = query.get("sentinel_password", [None])[-1]
    return SentinelURL(sentinels, unquote(path[0]), db, username, password, sentinel_password)


def _host_port(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [::1]:26379
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    try:
        return host, int(port) if port else SENTINEL_PORT
    except ValueError:
        raise ValueError(f"a sentinel's port is a number, not {port!r}") from None

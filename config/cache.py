"""The cache on a Redis behind Sentinel: `REDIS_URL=sentinel://host1:26379,host2:26379/<master>`.

Django's RedisCache opens its one URL with redis-py's `ConnectionPool.from_url`, which knows no
Sentinel, and splits a LOCATION at its commas. This one keeps the URL whole and takes the
master's pool from `jobs.redis_client` (the form JOBS_REDIS_URL and CELERY_BROKER_URL take too),
which asks a sentinel for the current master on each new connection: after a failover the
cache follows on its next connection. Chosen by config/settings/base.py for a sentinel:// URL.
"""

from __future__ import annotations

from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

from jobs.redis_client import redis_client


class SentinelCacheClient(RedisCacheClient):
    def _get_connection_pool(self, write: bool) -> Any:
        if 0 not in self._pools:
            timeout = float(self._pool_options.get("socket_timeout") or 2)
            self._pools[0] = redis_client(self._servers[0], timeout=timeout).connection_pool
        return self._pools[0]


class SentinelRedisCache(RedisCache):
    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._servers = [server]  # its commas separate sentinels, not servers
        self._class = SentinelCacheClient

"""The beat scheduler: django-celery-beat's database scheduler, one beat at a time.

- A lock with expiry in Redis (`SET NX PX`, renewed every tick) lets exactly one beat send
  tasks. A second beat started by mistake waits as a standby holding no lock, and takes over
  within `JOBS_BEAT_LOCK_TTL` seconds when the first one dies, re-reading the schedule (and the last run
  times its predecessor saved after every send) from the database first.
- Schedules live only in the database (`manage.py setup_schedules` seeds them); nothing from
  settings is written over what staff edited in the admin on beat start.
- A change of `TIME_ZONE` resets `last_run_at`, so schedules are not computed in the old zone.
- Every tick refreshes the beat's liveness file (for `manage.py probe beat`) and, while it
  leads, the beat heartbeat behind `/api/jobs/health/`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid

import redis
from django.conf import settings
from django.core.cache import cache
from django_celery_beat.models import PeriodicTask, PeriodicTasks
from django_celery_beat.schedulers import DatabaseScheduler

from jobs.heartbeat import heartbeat_write, liveness_touch

logger = logging.getLogger("jobs.beat")

LOCK_KEY = "jobs:beat:leader"
STANDBY_POLL = 5.0
#: Seconds before the next tick after one failed (a paused broker, a restarting database).
RETRY_AFTER_ERROR = 2.0
TIME_ZONE_KEY = "jobs:beat:time_zone"

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class BeatLock:
    """Leadership among beats: a Redis key holding the leader's token, with an expiry."""

    def __init__(self, url: str, ttl: float) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        self.ttl_ms = int(ttl * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False

    def acquire_or_renew(self) -> bool:
        """True while this beat leads. Any Redis error counts as not leading: better no beat for
        a moment than two."""
        try:
            if self.held and self.client.eval(_RENEW, 1, LOCK_KEY, self.token, self.ttl_ms):
                return True
            self.held = bool(self.client.set(LOCK_KEY, self.token, nx=True, px=self.ttl_ms))
        except (redis.RedisError, OSError) as exc:
            if self.held:
                logger.error("beat.lock_lost", extra={"error": str(exc)[:200]})
            self.held = False
        return self.held

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(redis.RedisError, OSError):
                self.client.eval(_RELEASE, 1, LOCK_KEY, self.token)
            self.held = False

    def holder(self) -> str | None:
        value = self.client.get(LOCK_KEY)
        return value.decode() if value else None


class LockedDatabaseScheduler(DatabaseScheduler):
    """`DatabaseScheduler` that sends only while it holds the beat lock."""

    def __init__(self, *args, **kwargs) -> None:
        ttl = settings.JOBS_BEAT_LOCK_TTL
        self.lock = BeatLock(settings.REDIS_URL, ttl=ttl)
        self.standby_poll = min(STANDBY_POLL, ttl / 3)
        self._leading = False
        super().__init__(*args, **kwargs)
        self.max_interval = min(self.max_interval, ttl / 3)

    def setup_schedule(self) -> None:
        # Deliberately no install_default_entries() / update_from_dict(beat_schedule): they
        # update_or_create rows on every start and would undo what staff edited in the admin.
        reset_schedules_if_time_zone_changed()

    def tick(self, *args, **kwargs) -> float:
        """One scheduler tick that never raises: Celery's beat loop (`Service.start`) catches only
        KeyboardInterrupt and SystemExit, so any error here (Redis paused or full, the database
        restarting) would end beat. It is logged and the tick tried again shortly."""
        try:
            return self._tick(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            logger.warning("beat.tick_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:500]})
            self._drop_database_connection()
            self._heap = None  # re-read the schedule from the database once it answers
            return RETRY_AFTER_ERROR

    def _drop_database_connection(self) -> None:
        from jobs.db import close_connection

        close_connection()

    def _tick(self, *args, **kwargs) -> float:
        leading = self.lock.acquire_or_renew()
        try:
            liveness_touch("beat", leading=leading)
        except OSError as exc:
            logger.warning("beat.liveness_write_failed", extra={"error": str(exc)[:200]})
        if not leading:
            if self._leading:
                logger.warning("beat.standby", extra={"reason": "lost the beat lock"})
                self._leading = False
            elif not getattr(self, "_announced_standby", False):
                logger.info("beat.standby", extra={"leader": self._holder()})
                self._announced_standby = True
            return self.standby_poll
        if not self._leading:
            logger.info("beat.leading", extra={"token": self.lock.token})
            self._leading = True
            self._announced_standby = False
            # The previous leader may have sent tasks since we last read: start from the database.
            self._initial_read = True
            self._heap = None
        try:
            heartbeat_write("beat")
        except Exception as exc:  # noqa: BLE001 - the cache (Redis) paused: sending goes on
            logger.warning("beat.heartbeat_write_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        return min(super().tick(*args, **kwargs), self.max_interval)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.lock.release()

    def _holder(self) -> str | None:
        try:
            return self.lock.holder()
        except (redis.RedisError, OSError):
            return None


def reset_schedules_if_time_zone_changed() -> bool:
    """Clears every `last_run_at` when `TIME_ZONE` differs from the one seen last; True if so."""
    try:
        previous = cache.get(TIME_ZONE_KEY)
        if previous and previous != settings.TIME_ZONE:
            count = PeriodicTask.objects.update(last_run_at=None)
            PeriodicTasks.update_changed()
            logger.warning(
                "beat.time_zone_changed",
                extra={"previous": previous, "current": settings.TIME_ZONE, "schedules_reset": count},
            )
            cache.set(TIME_ZONE_KEY, settings.TIME_ZONE, timeout=None)
            return True
        if previous != settings.TIME_ZONE:
            cache.set(TIME_ZONE_KEY, settings.TIME_ZONE, timeout=None)
    except Exception:
        logger.warning("beat.time_zone_check_failed", exc_info=True)
    return False

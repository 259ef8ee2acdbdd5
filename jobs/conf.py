"""Every setting `jobs` reads, with its default: a project sets only what it wants to change.

    from jobs.conf import jobs_settings
    jobs_settings.TASK_MAX_RETRIES  # settings.JOBS_TASK_MAX_RETRIES, or 5

Names are the Django setting without its `JOBS_` prefix; each read goes to `django.conf.settings`
at that moment, so `override_settings` and the `settings` fixture of pytest-django apply. Celery's
own options stay Celery's (`CELERY_*` through `app.config_from_object`); what `jobs` needs to know
of them (is the broker Redis?) it reads from the app.

`JOBS_REDIS_URL` (beat's lock, the ledger's view of the broker) is a plain Redis URL
(`redis://`, `rediss://`, `unix://`) or a Redis behind Sentinel, named by its sentinels and its
master (`jobs.redis_client` opens either):

    sentinel://[[user]:password@]host1:26379[,host2:26380,...]/<master_name>[/<db>][?sentinel_password=...]

The user and password are the master's; `sentinel_password` the sentinels' own, if they have one.
"""

from __future__ import annotations

from pathlib import Path
from tempfile import gettempdir
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Retries: exponential backoff from BASE seconds, capped at MAX, at most MAX_RETRIES times.
    "TASK_MAX_RETRIES": 5,
    "TASK_RETRY_BACKOFF_BASE": 60.0,
    "TASK_RETRY_BACKOFF_MAX": 3600.0,
    # Crash-loop quarantine: a job whose pool process died this many times is dead-lettered.
    "WORKER_LOST_LIMIT": 3,
    # Dead letters: who is mailed a digest of new ones, how often at most, how long they are kept.
    "DEAD_LETTER_ALERT_EMAILS": [],
    "DEAD_LETTER_ALERT_INTERVAL": 900,
    "DEAD_LETTER_RETENTION_DAYS": 30,
    # Liveness files the probes read (`manage.py probe worker|beat`), and how often they are written.
    "LIVENESS_DIR": Path(gettempdir()) / "jobs-liveness",
    "LIVENESS_INTERVAL": 5.0,
    # The Redis that holds beat's leader lock and the ledger's view of the broker; by default the
    # broker's own URL when the broker is Redis.
    "REDIS_URL": None,
    "BEAT_LOCK_TTL": 30.0,
    # The ledger: how often the sweeper looks for lost jobs, and when a job counts as lost.
    "LEDGER_SWEEP_INTERVAL": 15.0,
    "LEDGER_LOST_AFTER": 20.0,
    "LEDGER_MISSING_GRACE": 10.0,
    # Times the sweeper publishes one job again before it gives it up (dead letter
    # `lost_repeatedly`): a message something keeps dropping must not circle for ever.
    "LEDGER_REPUBLISH_LIMIT": 5,
    # The start lease (jobs.runtime.store): a run holds its job for this many seconds, renewed
    # every quarter of it; a lease not renewed for twice this long is a crash, and the job runs again.
    "LEASE_SECONDS": 20.0,
    # A run's start and finish commit without waiting for the WAL flush on PostgreSQL
    # (`synchronous_commit = off` for those two statements only): only a crash of the database
    # server can lose one, and the job then runs again. False: every transition waits for the flush.
    "LEASE_ASYNC_COMMIT": True,
    # Retries and countdowns at most this long wait in the broker (Celery's ETA, held by a worker);
    # longer ones wait in the job table and are published when due, checked every POLL seconds.
    "HOLD_IN_BROKER_MAX": 5.0,
    # After a publish on commit found the broker unreachable, the ones that follow in the same
    # process skip it for this many seconds and leave their jobs to the relay (0: always try).
    "PUBLISH_BREAKER_SECONDS": 5.0,
    "SCHEDULE_POLL_INTERVAL": 1.0,
    # Task history written in batches (jobs.runtime.results), and task events published in batches.
    "RESULTS_FLUSH_INTERVAL": 0.5,
    "RESULTS_BUFFER_LIMIT": 10_000,
    "TASK_EVENTS_FLUSH_INTERVAL": 0.1,
    # Seconds a worker gives running tasks after SIGTERM before giving them back to the broker
    # (Celery's soft shutdown), unless the project sets CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT itself.
    "SHUTDOWN_TIMEOUT": 30.0,
    # The worker's own Prometheus endpoint (0: off), on this address (loopback: set the address
    # Prometheus reaches, "0.0.0.0" in a container, to have it scraped).
    "WORKER_METRICS_PORT": 9808,
    "WORKER_METRICS_ADDR": "127.0.0.1",
    # Paused queues (jobs.models.PausedQueue): how often every worker reads them and stops or
    # starts consuming; and how long the attempts of retried or crashed jobs are kept.
    "PAUSE_SYNC_SECONDS": 2.0,
    "ATTEMPT_RETENTION_DAYS": 14,
    # What a client's password prompt names for the staff API (`WWW-Authenticate: Basic realm=...`).
    "API_REALM": "jobs API",
    # The hourly clean-up: files older than this many hours under TEMP_ROOT (None: nothing of its
    # own) and FILE_UPLOAD_TEMP_DIR.
    "CLEANUP_MAX_AGE_HOURS": 24.0,
    "TEMP_ROOT": None,
}


class JobsSettings:
    """`jobs_settings.NAME` is `settings.JOBS_NAME` if the project sets it, else the default."""

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"jobs has no setting {name!r} (JOBS_{name})")
        return getattr(settings, f"JOBS_{name}", DEFAULTS[name])

    # Celery's own options, as the project gives them to Celery (`CELERY_*` Django settings, the
    # namespace of Celery's standard Django setup), with Celery's defaults. Read from the settings
    # each time, like the rest, so `override_settings` applies.
    @staticmethod
    def celery(name: str, default: Any = None) -> Any:
        """The Django setting `CELERY_<name>` (Celery's `<name.lower()>`), or `default`."""
        return getattr(settings, f"CELERY_{name}", default)

    @property
    def visibility_timeout(self) -> float:
        """Seconds after which Redis gives an unacknowledged message to another worker (Celery's
        `broker_transport_options["visibility_timeout"]`, 3600 by default)."""
        options = self.celery("BROKER_TRANSPORT_OPTIONS") or {}
        return float(options.get("visibility_timeout", 3600))

    @property
    def task_time_limit(self) -> float:
        """Celery's hard time limit for every task (`task_time_limit`; 0: none)."""
        return float(self.celery("TASK_TIME_LIMIT") or 0)

    @property
    def default_queue(self) -> str:
        return str(self.celery("TASK_DEFAULT_QUEUE") or "celery")

    @property
    def broker_url(self) -> str:
        from celery import current_app

        return str(current_app.conf.broker_url or "")

    @property
    def broker_is_redis(self) -> bool:
        """Whether the Celery broker is Redis (visibility timeouts, queue lengths, the ledger's
        view of queued messages); RabbitMQ otherwise."""
        return urlsplit(self.broker_url).scheme in {"redis", "rediss", "sentinel"}

    @property
    def redis_url(self) -> str:
        """The Redis `jobs` keeps its locks in: JOBS_REDIS_URL (plain or `sentinel://`, see the
        module's docstring), else the broker when it is one plain Redis URL. A RabbitMQ broker
        needs JOBS_REDIS_URL, and so does a Sentinel broker: kombu's form of its URL names no
        master (that is in its transport options)."""
        configured = self.REDIS_URL
        if configured:
            return str(configured)
        if urlsplit(self.broker_url).scheme in {"redis", "rediss"}:
            return self.broker_url
        raise RuntimeError(
            "JOBS_REDIS_URL must name a Redis (redis://host:6379/0, or sentinel://host:26379/<master_name>)"
            " when the Celery broker is not a plain Redis URL"
        )


jobs_settings = JobsSettings()

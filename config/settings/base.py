"""Settings shared by every environment.

Every value an operator may change is read from the environment through `config.env`;
`local`, `test` and `production` only choose different defaults (see `config.env.use_profile`).
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from urllib.parse import urlsplit

import django
from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

from config.env import BASE_DIR, env, is_set, profile_default

VAR_DIR = BASE_DIR / "var"

# --- Core -----------------------------------------------------------------------------------

DEBUG = env.bool("DJANGO_DEBUG", default=profile_default("DJANGO_DEBUG", False))

DEV_SECRET_KEY = "django-insecure-dev-only-key-never-use-in-production"  # noqa: S105 - dev default
if DEBUG:
    SECRET_KEY = env.str("DJANGO_SECRET_KEY", default=DEV_SECRET_KEY)
else:
    # No default: a production process without its secret must not start.
    if not is_set("DJANGO_SECRET_KEY"):
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is false.")
    SECRET_KEY = env.str("DJANGO_SECRET_KEY")
    if SECRET_KEY == DEV_SECRET_KEY:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is the development key; set a real secret.")

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_prometheus",
    "django_celery_beat",
    "django_celery_results",
    "anymail",
    "jobs",
    "thumbnails",
    "mailer",
    "config.apps.SiteConfig",
]
if django.VERSION < (6, 0):  # Django 5.2 LTS: the Tasks API is the django-tasks backport
    INSTALLED_APPS.insert(INSTALLED_APPS.index("jobs"), "django_tasks")

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "jobs.middleware.RequestIdMiddleware",
    "config.middleware.JsonErrorMiddleware",
    "config.middleware.ProbeMiddleware",  # probes address pods by IP: answered before host checks
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------

DATABASES = {"default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}


# django-prometheus's wrappers of Django's own backends: the same vendor, features and options,
# plus the `django_db_*` metrics (queries, errors, query latency, new connections) on /metrics.
PROMETHEUS_DB_ENGINES = {
    "django.db.backends.sqlite3": "django_prometheus.db.backends.sqlite3",
    "django.db.backends.postgresql": "django_prometheus.db.backends.postgresql",
    "django.db.backends.mysql": "django_prometheus.db.backends.mysql",
    "django.contrib.gis.db.backends.postgis": "django_prometheus.db.backends.postgis",
    "django.contrib.gis.db.backends.spatialite": "django_prometheus.db.backends.spatialite",
}


def _tune_database(db: dict) -> dict:
    """Count queries through django-prometheus, make the embedded SQLite safe for a web process
    and a worker side by side, and keep PostgreSQL connections open between requests."""
    engine = db["ENGINE"] = PROMETHEUS_DB_ENGINES.get(db["ENGINE"], db["ENGINE"])
    options = db.setdefault("OPTIONS", {})
    if engine.endswith("sqlite3"):
        # WAL lets readers run beside the one writer; IMMEDIATE takes the write lock at BEGIN,
        # so two writers queue on busy_timeout instead of failing with "database is locked".
        options.setdefault(
            "init_command",
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=20000;",
        )
        options.setdefault("transaction_mode", "IMMEDIATE")
        options.setdefault("timeout", 20)
    elif "postgresql" in engine:
        db.setdefault("CONN_MAX_AGE", env.int("DJANGO_CONN_MAX_AGE", default=60))
        db["CONN_HEALTH_CHECKS"] = True
        options.setdefault("connect_timeout", 5)
        # A database host that vanishes (a partition, a black-holed route) hangs a query on a
        # connection that looks open until TCP gives up, about 15 minutes: data unacknowledged
        # for 30 s, or an idle connection whose keepalives go unanswered for about a minute,
        # closes it instead, and the caller's error path (retry, ledger) takes over.
        options.setdefault("keepalives", 1)
        options.setdefault("keepalives_idle", 30)
        options.setdefault("keepalives_interval", 10)
        options.setdefault("keepalives_count", 3)
        options.setdefault("tcp_user_timeout", 30_000)  # milliseconds
    return db


DATABASES["default"] = _tune_database(DATABASES["default"])
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache and Redis ------------------------------------------------------------------------

REDIS_URL = env.str("REDIS_URL", default=profile_default("REDIS_URL", "redis://127.0.0.1:6379/0"))

CACHES = {
    "default": {
        # REDIS_URL may name a Redis behind Sentinel (sentinel://host1:26379,host2:26379/<master>):
        # the cache, the broker (CELERY_BROKER_URL's default) and JOBS_REDIS_URL then follow a failover.
        "BACKEND": "config.cache.SentinelRedisCache"
        if urlsplit(REDIS_URL).scheme == "sentinel"
        else "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "jobsite",
        "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
    }
}

# --- Auth, i18n, static and media -----------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("DJANGO_TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("DJANGO_STATIC_ROOT", default=str(VAR_DIR / "static")))
MEDIA_URL = "media/"
MEDIA_ROOT = Path(env.str("MEDIA_ROOT", default=str(VAR_DIR / "media")))
TEMP_ROOT = Path(env.str("TEMP_ROOT", default=str(VAR_DIR / "tmp")))
FILE_UPLOAD_TEMP_DIR = str(TEMP_ROOT)
for _dir in (VAR_DIR, MEDIA_ROOT, TEMP_ROOT, STATIC_ROOT):
    # A read-only image is fine: the operator provides the volumes.
    with contextlib.suppress(OSError):
        _dir.mkdir(parents=True, exist_ok=True)

# Media (uploads, thumbnails, attachments) goes through Django's storage API only, so where it
# lives is configuration: MEDIA_ROOT on a local or shared disk, or an S3 bucket (or any
# S3-compatible store) through django-storages, which is imported only when chosen.
STORAGE_BACKEND = env.str("STORAGE_BACKEND", default="filesystem").strip().lower()
if STORAGE_BACKEND == "filesystem":
    _media_storage: dict = {"BACKEND": "django.core.files.storage.FileSystemStorage"}
elif STORAGE_BACKEND == "s3":
    if not is_set("AWS_STORAGE_BUCKET_NAME"):
        raise ImproperlyConfigured("STORAGE_BACKEND=s3 needs AWS_STORAGE_BUCKET_NAME.")
    try:
        from botocore.config import Config as _BotoConfig
    except ImportError as exc:  # pragma: no cover - boto3 comes with requirements/production.txt
        raise ImproperlyConfigured(
            "STORAGE_BACKEND=s3 needs django-storages[s3] (requirements/production.txt)."
        ) from exc
    _media_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        # No credentials here: boto3 finds them the standard way (AWS_ACCESS_KEY_ID and
        # AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the IAM role of the pod, task or instance).
        "OPTIONS": {
            "bucket_name": env.str("AWS_STORAGE_BUCKET_NAME").strip(),
            "region_name": env.str("AWS_S3_REGION_NAME", default="").strip() or None,
            "endpoint_url": env.str("AWS_S3_ENDPOINT_URL", default="").strip() or None,
            "location": env.str("AWS_LOCATION", default="").strip().strip("/"),  # key prefix in a shared bucket
            "custom_domain": env.str("AWS_S3_CUSTOM_DOMAIN", default="").strip() or None,  # a CDN in front
            # Names are unique by construction (a UUID for an original, the content's digest for
            # a thumbnail), so writing over an existing name can only put back the same bytes:
            # one PUT, which S3 applies whole. Without overwrite, django-storages would first ask
            # whether the name exists and then upload a suffixed copy for a redelivered task.
            "file_overwrite": True,
            "default_acl": None,  # the bucket's policy decides; new buckets refuse ACLs
            # A private bucket: URLs are signed and expire (unsigned behind AWS_S3_CUSTOM_DOMAIN).
            "querystring_auth": env.bool("AWS_QUERYSTRING_AUTH", default=True),
            "querystring_expire": env.int("AWS_QUERYSTRING_EXPIRE", default=3600),
            # An object never changes under its name (see above), so browsers and CDNs may keep it.
            "object_parameters": {"CacheControl": "max-age=31536000, immutable"},
            # A request (an upload) must not hang for botocore's default 60 s on an unreachable
            # endpoint; a worker's task is retried later anyway (StorageUnavailable is transient).
            "client_config": _BotoConfig(
                connect_timeout=5,
                read_timeout=30,
                retries={"mode": "standard", "max_attempts": 3},
                signature_version="s3v4",
                s3={"addressing_style": env.str("AWS_S3_ADDRESSING_STYLE", default="auto").strip() or "auto"},
            ),
        },
    }
else:
    raise ImproperlyConfigured(f"STORAGE_BACKEND must be 'filesystem' or 's3', not {STORAGE_BACKEND!r}.")
STORAGES = {
    "default": _media_storage,
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
SERVE_MEDIA = env.bool("SERVE_MEDIA", default=True)

# --- Email ----------------------------------------------------------------------------------

DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="noreply@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
ANYMAIL_ESP = env.str("ANYMAIL_ESP", default="").strip().lower()

# Provider name -> (anymail backend, the environment variables holding its credentials).
ANYMAIL_PROVIDERS = {
    "postmark": ("anymail.backends.postmark.EmailBackend", ["POSTMARK_SERVER_TOKEN"]),
    "mailgun": ("anymail.backends.mailgun.EmailBackend", ["MAILGUN_API_KEY", "MAILGUN_SENDER_DOMAIN"]),
    "sendgrid": ("anymail.backends.sendgrid.EmailBackend", ["SENDGRID_API_KEY"]),
    "amazon_ses": ("anymail.backends.amazon_ses.EmailBackend", []),
    "brevo": ("anymail.backends.brevo.EmailBackend", ["BREVO_API_KEY"]),
    "mailjet": ("anymail.backends.mailjet.EmailBackend", ["MAILJET_API_KEY", "MAILJET_SECRET_KEY"]),
    "resend": ("anymail.backends.resend.EmailBackend", ["RESEND_API_KEY"]),
}
ANYMAIL: dict[str, str] = {}
if ANYMAIL_ESP:
    if ANYMAIL_ESP not in ANYMAIL_PROVIDERS:
        raise ImproperlyConfigured(
            f"ANYMAIL_ESP={ANYMAIL_ESP!r} is not supported; use one of {', '.join(sorted(ANYMAIL_PROVIDERS))}."
        )
    EMAIL_BACKEND, _keys = ANYMAIL_PROVIDERS[ANYMAIL_ESP]
    for _key in _keys:
        if is_set(_key):
            ANYMAIL[_key] = env.str(_key)
    if is_set("ANYMAIL_API_URL"):  # e.g. a regional endpoint, or a local stub in tests
        ANYMAIL[f"{ANYMAIL_ESP.upper()}_API_URL"] = env.str("ANYMAIL_API_URL")
    if is_set("ANYMAIL_WEBHOOK_SECRET"):  # "user:password" the provider's webhooks must present
        ANYMAIL["WEBHOOK_SECRET"] = env.str("ANYMAIL_WEBHOOK_SECRET")
elif is_set("EMAIL_URL"):
    globals().update(env.email_url("EMAIL_URL"))
else:
    EMAIL_BACKEND = env.str(
        "EMAIL_BACKEND",
        default=profile_default("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend"),
    )
    EMAIL_HOST = env.str("EMAIL_HOST", default="localhost")
    EMAIL_PORT = env.int("EMAIL_PORT", default=25)
    EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", default="")
    EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD", default="")
    EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=False)
    EMAIL_USE_SSL = env.bool("EMAIL_USE_SSL", default=False)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=15)

JOBS_DEAD_LETTER_ALERT_EMAILS = env.list("DEAD_LETTER_ALERT_EMAILS", default=[])

# --- Mailer ---------------------------------------------------------------------------------

# Refused when an email is queued (mailer.services.email_queue).
MAILER_MAX_RECIPIENTS = env.int("MAILER_MAX_RECIPIENTS", default=50)
MAILER_MAX_ATTACHMENTS = env.int("MAILER_MAX_ATTACHMENTS", default=10)
MAILER_MAX_ATTACHMENT_BYTES = env.int("MAILER_MAX_ATTACHMENT_BYTES", default=10 * 1024 * 1024)
MAILER_MAX_TOTAL_ATTACHMENT_BYTES = env.int("MAILER_MAX_TOTAL_ATTACHMENT_BYTES", default=20 * 1024 * 1024)
MAILER_ATTACHMENT_CONTENT_TYPES = env.list(
    "MAILER_ATTACHMENT_CONTENT_TYPES",
    default=[
        "application/pdf",
        "text/plain",
        "text/csv",
        "text/calendar",
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
    ],
)
# One backend connection per worker process, reused across emails; closed after this many idle
# seconds or messages (servers drop idle sessions and cap messages per session).
MAILER_REUSE_CONNECTION = env.bool("MAILER_REUSE_CONNECTION", default=True)
MAILER_CONNECTION_MAX_IDLE = env.float("MAILER_CONNECTION_MAX_IDLE", default=30.0)
MAILER_CONNECTION_MAX_MESSAGES = env.int("MAILER_CONNECTION_MAX_MESSAGES", default=100)
# An email left in `sending` longer than this had its worker die mid hand-off; 0 means the task
# time limit plus the email timeout (no attempt can still be running after that).
MAILER_SENDING_LEASE_SECONDS = env.int("MAILER_SENDING_LEASE_SECONDS", default=0)

# --- Uploads and thumbnails -----------------------------------------------------------------

THUMBNAIL_SIZES = sorted(set(env.list("THUMBNAIL_SIZES", cast=int, default=[128, 256, 512])))
MAX_UPLOAD_BYTES = env.int("MAX_UPLOAD_BYTES", default=20 * 1024 * 1024)
MAX_IMAGE_PIXELS = env.int("MAX_IMAGE_PIXELS", default=50_000_000)
# Django refuses bigger non-file bodies itself; file uploads are checked against MAX_UPLOAD_BYTES.
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
JOBS_CLEANUP_MAX_AGE_HOURS = env.float("CLEANUP_MAX_AGE_HOURS", default=24)

# --- Task machinery (jobs; every JOBS_ setting and its default: jobs/conf.py) ----------------

JOBS_TEMP_ROOT = TEMP_ROOT  # the hourly clean-up's own directory

JOBS_TASK_RETRY_BACKOFF_BASE = env.float("TASK_RETRY_BACKOFF_BASE", default=60.0)
JOBS_TASK_RETRY_BACKOFF_MAX = env.float("TASK_RETRY_BACKOFF_MAX", default=3600.0)
JOBS_TASK_MAX_RETRIES = env.int("TASK_MAX_RETRIES", default=5)
CELERY_VISIBILITY_TIMEOUT = env.int("CELERY_VISIBILITY_TIMEOUT", default=3600)
CELERY_SHUTDOWN_TIMEOUT = env.float("CELERY_SHUTDOWN_TIMEOUT", default=30.0)
JOBS_WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", default=9808)
# Loopback in development; every interface in production, where Prometheus scrapes each worker's
# container (docker/prometheus) and the port is not published.
JOBS_WORKER_METRICS_ADDR = env.str("WORKER_METRICS_ADDR", default="127.0.0.1" if DEBUG else "0.0.0.0")  # noqa: S104
JOBS_API_REALM = "jobsite API"  # the staff API's name in a client's password prompt
FLOWER_BASIC_AUTH = env.str("FLOWER_BASIC_AUTH", default="")
# A task whose worker died under it this many times in a row is dead-lettered (crash loop).
JOBS_WORKER_LOST_LIMIT = env.int("JOBS_WORKER_LOST_LIMIT", default=3)
JOBS_DEAD_LETTER_ALERT_INTERVAL = env.int("JOBS_DEAD_LETTER_ALERT_INTERVAL", default=900)
JOBS_DEAD_LETTER_RETENTION_DAYS = env.int("JOBS_DEAD_LETTER_RETENTION_DAYS", default=30)
# Where workers and beat write the files `manage.py probe` reads (local to the container).
JOBS_LIVENESS_DIR = Path(env.str("LIVENESS_DIR", default=str(VAR_DIR / "run")))
JOBS_LIVENESS_INTERVAL = env.float("JOBS_LIVENESS_INTERVAL", default=5.0)
# Seconds a dead beat blocks its standby at most (the leader renews the lock every tick).
JOBS_BEAT_LOCK_TTL = env.float("JOBS_BEAT_LOCK_TTL", default=30.0)
# The job table (jobs.runtime.ledger): every worker's sweeper thread runs this often (0: off), one at a
# time; a published job no run has started is looked for in the broker once it is this old, and
# published again when two sweeps this far apart did not find it (a copy that was in fact still
# somewhere finds the job's lease taken and does nothing), at most LEDGER_REPUBLISH_LIMIT times.
JOBS_LEDGER_SWEEP_INTERVAL = env.float("JOBS_LEDGER_SWEEP_INTERVAL", default=15.0)
JOBS_LEDGER_LOST_AFTER = env.float("JOBS_LEDGER_LOST_AFTER", default=20.0)
JOBS_LEDGER_MISSING_GRACE = env.float("JOBS_LEDGER_MISSING_GRACE", default=10.0)
JOBS_LEDGER_REPUBLISH_LIMIT = env.int("JOBS_LEDGER_REPUBLISH_LIMIT", default=5)
# The start lease: a run holds its job this long, renewed every quarter of it; a lease not renewed
# for twice this long is a crash and the job runs again. Waits (retries, countdowns) longer than
# HOLD_IN_BROKER_MAX seconds are kept in the job table and published when due (polled this often).
JOBS_LEASE_SECONDS = env.float("JOBS_LEASE_SECONDS", default=20.0)
# A run's start and finish commit without waiting for PostgreSQL's WAL flush (only a database crash
# can lose one; the job then runs again): False makes them wait like every other write.
JOBS_LEASE_ASYNC_COMMIT = env.bool("JOBS_LEASE_ASYNC_COMMIT", default=True)
JOBS_HOLD_IN_BROKER_MAX = env.float("JOBS_HOLD_IN_BROKER_MAX", default=5.0)
# A publish on commit that found the broker unreachable: the publishes of the next this many
# seconds in that process go straight to the relay (a request never queues behind a dead broker).
JOBS_PUBLISH_BREAKER_SECONDS = env.float("JOBS_PUBLISH_BREAKER_SECONDS", default=5.0)
JOBS_SCHEDULE_POLL_INTERVAL = env.float("JOBS_SCHEDULE_POLL_INTERVAL", default=1.0)
# Task history (jobs/runtime/results.py): a pool process writes its tasks' results this often, in one
# statement, and keeps at most this many rows while the database refuses them.
JOBS_RESULTS_FLUSH_INTERVAL = env.float("JOBS_RESULTS_FLUSH_INTERVAL", default=0.5)
JOBS_RESULTS_BUFFER_LIMIT = env.int("JOBS_RESULTS_BUFFER_LIMIT", default=10_000)

# --- Celery (read by config/celery.py through the CELERY_ namespace) ------------------------

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
BROKER_SCHEME = urlsplit(CELERY_BROKER_URL).scheme
BROKER_IS_REDIS = BROKER_SCHEME in {"redis", "rediss", "sentinel"}
# Beat's leader lock and the ledger's bookkeeping live in REDIS_URL, whatever the broker, unless
# JOBS_REDIS_URL names another Redis: a plain URL or sentinel://host1:26379,host2:26379/<master>.
JOBS_REDIS_URL = env.str("JOBS_REDIS_URL", default=REDIS_URL)

CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default="django-db")
if CELERY_RESULT_BACKEND == "django-db":
    # django-celery-results' own backend, with writes that ride out database restarts
    # (jobs/runtime/results.py); django-celery-results' entry point would win over a loader alias.
    CELERY_RESULT_BACKEND = "jobs.runtime.results:DatabaseBackend"
CELERY_RESULT_BACKEND_ALWAYS_RETRY = True  # a cut connection is replaced (jobs/runtime/results.py)
CELERY_RESULT_BACKEND_MAX_RETRIES = 5
CELERY_RESULT_EXTENDED = True  # keeps task name and queue on results, for reports and the admin
CELERY_RESULT_EXPIRES = env.int("CELERY_RESULT_EXPIRES", default=7 * 24 * 3600)
CELERY_CACHE_BACKEND = "default"

# JSON only: a pickled message is refused by the worker before anything is unpacked.
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_EVENT_SERIALIZER = "json"

CELERY_TASK_QUEUES = tuple(
    Queue(name, Exchange(name, type="direct"), routing_key=name) for name in ("high", "normal", "low")
)
CELERY_TASK_DEFAULT_QUEUE = "normal"
CELERY_TASK_DEFAULT_EXCHANGE = "normal"
CELERY_TASK_DEFAULT_ROUTING_KEY = "normal"
CELERY_TASK_CREATE_MISSING_QUEUES = False
# Routing by task name; a task's own `queue=` only applies when no route matches.
CELERY_TASK_ROUTES = {
    "mailer.*": {"queue": "high"},
    "jobs.heartbeat": {"queue": "high"},
    "jobs.dead_letter_digest": {"queue": "high"},
    "jobs.outbox_relay": {"queue": "high"},
    "thumbnails.*": {"queue": "normal"},
    "jobs.*": {"queue": "low"},
    "celery.backend_cleanup": {"queue": "low"},
}

# Nothing is lost: a task is acknowledged only after it ran, given back when its worker dies,
# and each worker process holds at most one message it has not started.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_ACKS_ON_FAILURE = True  # a failed task is recorded as a dead letter, then acked
CELERY_TASK_ACKS_ON_TIMEOUT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = CELERY_SHUTDOWN_TIMEOUT
# Off: Celery's soft shutdown sleeps its whole timeout, so an idle worker would wait 30 s for
# nothing. Reserved and ETA messages are given back at shutdown either way (late ack).
CELERY_WORKER_ENABLE_SOFT_SHUTDOWN_ON_IDLE = False
CELERY_TASK_TRACK_STARTED = True
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=600)
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=540)
CELERY_WORKER_CONCURRENCY = env.int("CELERY_WORKER_CONCURRENCY", default=None)
# The pool of this worker process (`-P` overrides it): `prefork` by default; `threads` suits a
# worker whose tasks wait on the network far longer than they compute (docs/performance.md, "I/O
# queues"). Chosen per worker, so per queue group: compose and k8s run `high` (mail) apart.
CELERY_WORKER_POOL = env.str("CELERY_WORKER_POOL", default="prefork")
if CELERY_WORKER_POOL not in {"prefork", "threads", "solo", "gevent", "eventlet"}:
    raise ImproperlyConfigured(
        f"CELERY_WORKER_POOL must be prefork, threads, solo, gevent or eventlet, not {CELERY_WORKER_POOL!r}"
    )
# 0 turns a limit off (billiard refuses 0 itself: None is its "no limit").
CELERY_WORKER_MAX_TASKS_PER_CHILD = env.int("CELERY_WORKER_MAX_TASKS_PER_CHILD", default=10_000) or None
CELERY_WORKER_MAX_MEMORY_PER_CHILD = env.int("CELERY_WORKER_MAX_MEMORY_PER_CHILD", default=256_000) or None  # KiB
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's Django fix-up closes every database connection before and after every task: each task
# that touches the database then opens a new one (milliseconds on PostgreSQL). This number of tasks
# is never reached; jobs.runtime.handlers applies Django's request-cycle rule instead (CONN_MAX_AGE, health
# checks, a connection that errored dropped).
CELERY_DB_REUSE_MAX = 2**31
# No CELERY_WORKER_CONSUMER: `jobs` puts its own consumer (jobs.runtime.worker.JobConsumer, which
# dead-letters a message it cannot run) and its bootsteps into every worker that starts.
# Task events feed Flower's live task list; they cost about a third of the throughput of tiny
# tasks (docs/performance.md). CELERY_TASK_EVENTS=false turns them off (set Flower's
# FLOWER_ENABLE_EVENTS=false too, or Flower switches them back on in running workers).
CELERY_WORKER_SEND_TASK_EVENTS = env.bool("CELERY_TASK_EVENTS", default=True)
CELERY_TASK_SEND_SENT_EVENT = CELERY_WORKER_SEND_TASK_EVENTS
# A worker publishes its task events in batches, at most this many seconds late (0: Celery's own
# publish on every loop iteration; see jobs.runtime.worker.JobConsumer).
JOBS_TASK_EVENTS_FLUSH_INTERVAL = env.float("JOBS_TASK_EVENTS_FLUSH_INTERVAL", default=0.1)

CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A channel error (Redis refusing writes at maxmemory: OutOfMemoryError is a ResponseError)
# restarts the consumer like a lost connection does, instead of stopping the worker with
# "Unrecoverable error"; the ledger brings back a message lost in between.
CELERY_BROKER_CHANNEL_ERROR_RETRY = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = env.int("CELERY_BROKER_CONNECTION_MAX_RETRIES", default=100)
CELERY_BROKER_CONNECTION_TIMEOUT = 5
CELERY_BROKER_POOL_LIMIT = env.int("CELERY_BROKER_POOL_LIMIT", default=10)
CELERY_BROKER_HEARTBEAT = 30  # AMQP only
# Publishing retries briefly so a request never hangs on a dead broker.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}

_BROKER_SOCKET_TIMEOUT = env.float("CELERY_BROKER_SOCKET_TIMEOUT", default=15.0)
if _BROKER_SOCKET_TIMEOUT <= 0:
    raise ImproperlyConfigured(
        f"CELERY_BROKER_SOCKET_TIMEOUT must be a number of seconds above 0, not {_BROKER_SOCKET_TIMEOUT}"
    )
_TCP_KEEPALIVE = {
    option: value
    for option, value in (
        (getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None)), 10),  # macOS: TCP_KEEPALIVE
        (getattr(socket, "TCP_KEEPINTVL", None), 5),
        (getattr(socket, "TCP_KEEPCNT", None), 2),
        (getattr(socket, "TCP_USER_TIMEOUT", None), 10_000),  # Linux only
    )
    if option is not None
}
if BROKER_IS_REDIS:
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": CELERY_VISIBILITY_TIMEOUT,
        # Look for messages of dead workers every few seconds (kombu's default scans only every
        # 10 x 10 s), so a crashed worker's tasks come back soon after the visibility timeout.
        "unacked_restore_interval": max(1, min(10, CELERY_VISIBILITY_TIMEOUT // 4)),
        "unacked_restore_throttle": 1,
        # Serve queues in the order given to -Q: `high` before `normal` before `low`.
        "queue_order_strategy": "priority",
        # A read that waits longer fails (the consumer reconnects; a publish is left to the
        # ledger). config/gunicorn.py sets 2 s for the web's processes: a request never waits
        # long on a broker the network lost, where nothing answers or refuses.
        "socket_timeout": _BROKER_SOCKET_TIMEOUT,
        # A request must not hang on a dead broker (the outbox keeps the task): 2 s, 1 s for the web.
        "socket_connect_timeout": min(2.0, _BROKER_SOCKET_TIMEOUT / 2),
        "socket_keepalive": True,
        # A broker host that vanished (a partition, a Sentinel master's host gone) leaves pooled
        # connections that look open: each command on one would wait its socket timeout, in the
        # worker's event loop. The kernel finds them dead in the background instead: idle ones
        # after 10 s and an unanswered probe (about 15 s), busy ones after 10 s without an ACK.
        "socket_keepalive_options": _TCP_KEEPALIVE,
        # redis-py tries a command that timed out once more (and its connect twice): a short
        # timeout is there to fail fast, so it is not retried.
        "retry_on_timeout": _BROKER_SOCKET_TIMEOUT >= 10,
        "health_check_interval": 25,
        "max_connections": 50,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}

if BROKER_SCHEME == "sentinel":
    # The broker behind Sentinel, named as JOBS_REDIS_URL is (sentinel://h1:26379,h2:26379/<master>):
    # kombu wants one sentinel:// per sentinel and the master in its transport options.
    from jobs.redis_client import kombu_sentinel

    try:
        CELERY_BROKER_URL, _sentinel_options = kombu_sentinel(CELERY_BROKER_URL)
    except ValueError as exc:
        raise ImproperlyConfigured(f"CELERY_BROKER_URL: {exc}.") from None
    CELERY_BROKER_TRANSPORT_OPTIONS.update(_sentinel_options)
    # Celery takes CELERY_BROKER_URL from the environment before these settings (unconverted,
    # when that is where it came from), but the read and write URLs from here first.
    CELERY_BROKER_READ_URL = CELERY_BROKER_WRITE_URL = CELERY_BROKER_URL

if BROKER_SCHEME == "amqps":
    # RabbitMQ over TLS takes the same URL options as `rediss://` (ssl_cert_reqs, ssl_ca_certs,
    # ssl_certfile, ssl_keyfile, ssl_check_hostname). kombu would hand them to py-amqp under their
    # `ssl_` names, which it refuses; the transport's own `ssl` option wins over them. Verified by
    # default: the system CAs (or ssl_ca_certs), and the certificate must name the URL's host.
    import ssl

    from kombu.utils.url import parse_url

    _url = CELERY_BROKER_URL.split(";")[0]  # failover URLs: the first one's options apply to all
    try:
        _tls = {k.removeprefix("ssl_"): v for k, v in (parse_url(_url).get("ssl") or {}).items()}
    except KeyError as exc:
        _bad = f"ssl_cert_reqs must be required, optional or none, not {exc}"
        raise ImproperlyConfigured(f"CELERY_BROKER_URL: {_bad}.") from None
    if _unknown := set(_tls) - {"cert_reqs", "ca_certs", "certfile", "keyfile", "check_hostname"}:
        raise ImproperlyConfigured(f"CELERY_BROKER_URL: unknown TLS options {sorted('ssl_' + k for k in _unknown)}.")
    _tls.setdefault("cert_reqs", ssl.CERT_REQUIRED)
    if _tls.pop("check_hostname", True) and _tls["cert_reqs"] != ssl.CERT_NONE:
        _tls["server_hostname"] = urlsplit(_url).hostname
    CELERY_BROKER_TRANSPORT_OPTIONS["ssl"] = _tls

CELERY_TIMEZONE = TIME_ZONE
# django-celery-beat's database scheduler behind a Redis lock: one beat sends, others stand by.
CELERY_BEAT_SCHEDULER = "jobs.runtime.beat:LockedDatabaseScheduler"
CELERY_BEAT_SYNC_EVERY = 1  # save last_run_at after every send, so a successor never sends it again
DJANGO_CELERY_BEAT_TZ_AWARE = True

# --- Django's Tasks API ----------------------------------------------------------------------
# `@task` functions (django.tasks; the django-tasks backport on 5.2) run on the Celery workers
# through jobs: retries, dead letters, the ledger, results (docs/django-tasks.md).
TASKS = {"default": {"BACKEND": "jobs.backends.CeleryBackend"}}

# --- Logging --------------------------------------------------------------------------------

LOG_FORMAT = env.str("LOG_FORMAT", default=profile_default("LOG_FORMAT", "console" if DEBUG else "json"))
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()
if LOG_FORMAT not in {"json", "console"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be 'json' or 'console', not {LOG_FORMAT!r}.")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "jobs.logging.ContextFilter"}},
    "formatters": {
        "json": {"()": "config.logging.JsonFormatter"},
        "console": {"()": "config.logging.ConsoleFormatter"},
    },
    "handlers": {
        "default": {
            "class": "config.logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"],
        },
    },
    "root": {"handlers": ["default"], "level": LOG_LEVEL},
    "loggers": {
        # Replace Django's own console handlers, so every line goes through one formatter once.
        "django": {"handlers": [], "level": LOG_LEVEL, "propagate": True},
        "django.server": {"handlers": [], "level": LOG_LEVEL, "propagate": True},
        "django.db.backends": {"level": "INFO"},
        "celery": {"level": LOG_LEVEL},
        "kombu": {"level": "WARNING"},
        "amqp": {"level": "WARNING"},
    },
}

# --- Security (tightened further in production) ---------------------------------------------

X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SESSION_COOKIE_HTTPONLY = True
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
    # Probes come over plain HTTP from inside the cluster.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
    SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=True)

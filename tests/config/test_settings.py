"""Settings: every contract variable is read, and each settings module picks its defaults."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

import config.env
from config.env import BASE_DIR

CONTRACT_VARIABLES = [
    "DJANGO_SECRET_KEY",
    "DJANGO_DEBUG",
    "DJANGO_ALLOWED_HOSTS",
    "DATABASE_URL",
    "REDIS_URL",
    "JOBS_REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "CELERY_WORKER_CONCURRENCY",
    "CELERY_VISIBILITY_TIMEOUT",
    "CELERY_BROKER_SOCKET_TIMEOUT",
    "JOBS_PUBLISH_BREAKER_SECONDS",
    "CELERY_SHUTDOWN_TIMEOUT",
    "TASK_RETRY_BACKOFF_BASE",
    "TASK_RETRY_BACKOFF_MAX",
    "TASK_MAX_RETRIES",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "EMAIL_URL",
    "EMAIL_BACKEND",
    "EMAIL_HOST",
    "EMAIL_PORT",
    "ANYMAIL_ESP",
    "POSTMARK_SERVER_TOKEN",
    "DEFAULT_FROM_EMAIL",
    "DEAD_LETTER_ALERT_EMAILS",
    "MEDIA_ROOT",
    "THUMBNAIL_SIZES",
    "MAX_UPLOAD_BYTES",
    "MAX_IMAGE_PIXELS",
    "CLEANUP_MAX_AGE_HOURS",
    "FLOWER_BASIC_AUTH",
    "WORKER_METRICS_PORT",
    "WORKER_METRICS_ADDR",
    "ANYMAIL_API_URL",
    "ANYMAIL_WEBHOOK_SECRET",
]


@pytest.fixture
def load_settings(monkeypatch):
    """Imports a settings module afresh under a given environment, without touching the
    settings this test process runs with."""
    saved_profile = dict(config.env._profile)
    names = ("config.settings.base", "config.settings.local", "config.settings.production")
    saved_modules = {name: sys.modules.get(name) for name in names}

    def load(module: str, **environ: str):
        for name in CONTRACT_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        config.env._profile.clear()
        for name in ("config.settings.base", f"config.settings.{module}"):
            sys.modules.pop(name, None)
        return importlib.import_module(f"config.settings.{module}")

    yield load
    config.env._profile.clear()
    config.env._profile.update(saved_profile)
    for name, module in saved_modules.items():  # the modules this process runs with, put back
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def test_local_defaults(load_settings):
    s = load_settings("local")
    assert s.DEBUG is True
    assert s.LOG_FORMAT == "console"
    assert s.SECRET_KEY == s.DEV_SECRET_KEY
    assert s.DATABASES["default"]["ENGINE"] == "django_prometheus.db.backends.sqlite3"
    assert str(s.DATABASES["default"]["NAME"]).endswith("var/db.sqlite3")
    assert s.DATABASES["default"]["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in s.DATABASES["default"]["OPTIONS"]["init_command"]
    assert s.CELERY_BROKER_URL == "redis://127.0.0.1:6379/0"
    assert s.CELERY_RESULT_BACKEND == "jobs.runtime.results:DatabaseBackend"  # `django-db`, riding out restarts
    assert s.EMAIL_BACKEND == "django.core.mail.backends.console.EmailBackend"
    assert s.THUMBNAIL_SIZES == [128, 256, 512]
    assert s.MAX_UPLOAD_BYTES == 20971520
    assert s.MAX_IMAGE_PIXELS == 50_000_000
    assert s.JOBS_TASK_RETRY_BACKOFF_BASE == 60
    assert s.JOBS_TASK_RETRY_BACKOFF_MAX == 3600
    assert s.JOBS_TASK_MAX_RETRIES == 5
    assert s.JOBS_WORKER_METRICS_PORT == 9808
    assert s.JOBS_WORKER_METRICS_ADDR == "127.0.0.1"  # a laptop's metrics are not the network's
    assert s.DEFAULT_FROM_EMAIL == "noreply@localhost"


def test_celery_settings_are_safe_by_default(load_settings):
    s = load_settings("local")
    assert s.CELERY_ACCEPT_CONTENT == ["json"]
    assert s.CELERY_TASK_SERIALIZER == s.CELERY_RESULT_SERIALIZER == "json"
    assert [q.name for q in s.CELERY_TASK_QUEUES] == ["high", "normal", "low"]
    assert s.CELERY_TASK_DEFAULT_QUEUE == "normal"
    assert s.CELERY_TASK_ACKS_LATE is True
    assert s.CELERY_TASK_REJECT_ON_WORKER_LOST is True
    assert s.CELERY_WORKER_PREFETCH_MULTIPLIER == 1
    assert s.CELERY_WORKER_HIJACK_ROOT_LOGGER is False
    assert s.CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT == 30
    assert s.CELERY_WORKER_MAX_MEMORY_PER_CHILD > 0
    assert s.CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP is True
    assert s.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] == 3600
    assert s.CELERY_BROKER_TRANSPORT_OPTIONS["queue_order_strategy"] == "priority"
    timeouts = ("socket_timeout", "socket_connect_timeout", "retry_on_timeout")
    assert [s.CELERY_BROKER_TRANSPORT_OPTIONS[k] for k in timeouts] == [15, 2, True]
    assert s.CELERY_BEAT_SCHEDULER == "jobs.runtime.beat:LockedDatabaseScheduler"  # a DatabaseScheduler subclass


def test_one_sentinel_url_puts_the_cache_the_broker_and_the_locks_behind_sentinel(load_settings):
    url = "sentinel://:pw@s1:26379,s2:26379/jobs/1"
    s = load_settings("local", REDIS_URL=url)
    assert s.CACHES["default"]["BACKEND"] == "config.cache.SentinelRedisCache"
    assert s.CACHES["default"]["LOCATION"] == s.JOBS_REDIS_URL == url
    assert s.CELERY_BROKER_URL == "sentinel://:pw@s1:26379/1;sentinel://:pw@s2:26379/1"
    # Celery reads CELERY_BROKER_URL from the environment first; these two it takes from here.
    assert s.CELERY_BROKER_READ_URL == s.CELERY_BROKER_WRITE_URL == s.CELERY_BROKER_URL
    assert s.CELERY_BROKER_TRANSPORT_OPTIONS["master_name"] == "jobs"
    assert s.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] == 3600  # the Redis options stay

    with pytest.raises(ImproperlyConfigured, match="CELERY_BROKER_URL: a sentinel:// URL names its master"):
        load_settings("local", CELERY_BROKER_URL="sentinel://s1:26379;sentinel://s2:26379")


def test_environment_wins_over_module_defaults(load_settings, tmp_path):
    s = load_settings(
        "local",
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY="k" * 50,
        DJANGO_ALLOWED_HOSTS="example.com,www.example.com",
        DATABASE_URL="postgres://app:pw@db.internal:5432/app",
        REDIS_URL="redis://cache.internal:6379/1",
        CELERY_WORKER_CONCURRENCY="3",
        CELERY_VISIBILITY_TIMEOUT="120",
        CELERY_BROKER_SOCKET_TIMEOUT="2",
        CELERY_SHUTDOWN_TIMEOUT="12.5",
        TASK_RETRY_BACKOFF_BASE="0.5",
        TASK_RETRY_BACKOFF_MAX="8",
        TASK_MAX_RETRIES="2",
        LOG_LEVEL="debug",
        DEFAULT_FROM_EMAIL="ops@example.com",
        DEAD_LETTER_ALERT_EMAILS="a@example.com,b@example.com",
        MEDIA_ROOT=str(tmp_path / "m"),
        THUMBNAIL_SIZES="64,32,64",
        MAX_UPLOAD_BYTES="1000",
        MAX_IMAGE_PIXELS="2000",
        CLEANUP_MAX_AGE_HOURS="1.5",
        FLOWER_BASIC_AUTH="admin:pw",
        WORKER_METRICS_PORT="0",
        CELERY_WORKER_MAX_TASKS_PER_CHILD="0",
        CELERY_WORKER_MAX_MEMORY_PER_CHILD="512000",
    )
    assert s.DEBUG is False
    assert s.LOG_FORMAT == "json"  # follows debug when not set
    assert s.SESSION_COOKIE_SECURE is True
    assert s.ALLOWED_HOSTS == ["example.com", "www.example.com"]
    db = s.DATABASES["default"]
    assert (db["ENGINE"], db["HOST"], db["NAME"]) == ("django_prometheus.db.backends.postgresql", "db.internal", "app")
    assert db["CONN_MAX_AGE"] == 60
    assert db["CONN_HEALTH_CHECKS"] is True
    assert s.CELERY_BROKER_URL == "redis://cache.internal:6379/1"
    assert s.CACHES["default"]["LOCATION"] == "redis://cache.internal:6379/1"
    assert s.CELERY_WORKER_CONCURRENCY == 3
    assert s.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] == 120
    # The web's (config/gunicorn.py): fail fast, no retry of a timed-out command.
    timeouts = ("socket_timeout", "socket_connect_timeout", "retry_on_timeout")
    assert [s.CELERY_BROKER_TRANSPORT_OPTIONS[k] for k in timeouts] == [2, 1, False]
    assert s.CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT == 12.5
    assert (s.JOBS_TASK_RETRY_BACKOFF_BASE, s.JOBS_TASK_RETRY_BACKOFF_MAX, s.JOBS_TASK_MAX_RETRIES) == (0.5, 8, 2)
    assert s.LOG_LEVEL == "DEBUG"
    assert s.JOBS_DEAD_LETTER_ALERT_EMAILS == ["a@example.com", "b@example.com"]
    assert tmp_path / "m" == s.MEDIA_ROOT
    assert s.MEDIA_ROOT.is_dir()
    assert s.THUMBNAIL_SIZES == [32, 64]
    assert (s.MAX_UPLOAD_BYTES, s.MAX_IMAGE_PIXELS, s.JOBS_CLEANUP_MAX_AGE_HOURS) == (1000, 2000, 1.5)
    assert s.FLOWER_BASIC_AUTH == "admin:pw"
    assert s.JOBS_WORKER_METRICS_PORT == 0
    assert s.JOBS_WORKER_METRICS_ADDR == "0.0.0.0"  # noqa: S104 - production: Prometheus scrapes each container
    assert s.CELERY_WORKER_MAX_TASKS_PER_CHILD is None  # 0: no limit
    assert s.CELERY_WORKER_MAX_MEMORY_PER_CHILD == 512000


def test_rabbitmq_broker_gets_no_redis_only_options(load_settings):
    s = load_settings("local", CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//")
    assert s.BROKER_IS_REDIS is False
    assert "queue_order_strategy" not in s.CELERY_BROKER_TRANSPORT_OPTIONS
    assert s.CELERY_BROKER_TRANSPORT_OPTIONS["confirm_publish"] is True


@pytest.mark.parametrize(
    "broker", ["amqp://guest:guest@127.0.0.1:5672//", "redis://broker:6379/1", "sentinel://s:26379/mymaster"]
)
def test_the_site_keeps_the_beat_lock_and_the_ledger_in_redis_url_whatever_the_broker(load_settings, broker):
    s = load_settings("local", CELERY_BROKER_URL=broker, REDIS_URL="redis://cache:6379/0")
    assert s.JOBS_REDIS_URL == "redis://cache:6379/0"


def test_jobs_redis_url_may_name_a_redis_behind_sentinel_apart_from_the_cache(load_settings):
    s = load_settings("local", REDIS_URL="redis://cache:6379/0", JOBS_REDIS_URL="sentinel://s1,s2/mymaster/2")
    assert s.JOBS_REDIS_URL == "sentinel://s1,s2/mymaster/2"
    assert s.CACHES["default"]["LOCATION"] == "redis://cache:6379/0"


def test_debug_false_requires_a_secret_key(load_settings):
    with pytest.raises(ImproperlyConfigured, match="DJANGO_SECRET_KEY must be set"):
        load_settings("local", DJANGO_DEBUG="false")


def test_production_refuses_the_development_key(load_settings):
    with pytest.raises(ImproperlyConfigured, match="development key"):
        load_settings("production", DJANGO_SECRET_KEY="django-insecure-dev-only-key-never-use-in-production")


def test_email_url_configures_smtp(load_settings):
    s = load_settings("local", EMAIL_URL="smtp://user:pw@mail.example.com:2525")
    assert s.EMAIL_BACKEND == "django.core.mail.backends.smtp.EmailBackend"
    assert (s.EMAIL_HOST, s.EMAIL_PORT, s.EMAIL_HOST_USER) == ("mail.example.com", 2525, "user")


def test_anymail_esp_selects_the_provider(load_settings):
    s = load_settings(
        "local",
        ANYMAIL_ESP="Postmark",
        POSTMARK_SERVER_TOKEN="tok",
        ANYMAIL_API_URL="http://127.0.0.1:9/",
        ANYMAIL_WEBHOOK_SECRET="hook:secret",
    )
    assert s.EMAIL_BACKEND == "anymail.backends.postmark.EmailBackend"
    assert s.ANYMAIL == {
        "POSTMARK_SERVER_TOKEN": "tok",
        "POSTMARK_API_URL": "http://127.0.0.1:9/",
        "WEBHOOK_SECRET": "hook:secret",
    }


def test_unknown_anymail_esp_is_refused(load_settings):
    with pytest.raises(ImproperlyConfigured, match="ANYMAIL_ESP='pigeon' is not supported"):
        load_settings("local", ANYMAIL_ESP="pigeon")


def test_bad_log_format_is_refused(load_settings):
    with pytest.raises(ImproperlyConfigured, match="LOG_FORMAT"):
        load_settings("local", LOG_FORMAT="xml")


def _manage(*args: str, **environ: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CONTRACT_VARIABLES and k != "DJANGO_SETTINGS_MODULE"}
    env.update(environ)
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )


def test_production_will_not_boot_without_secret_key():
    result = _manage("check", DJANGO_SETTINGS_MODULE="config.settings.production")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in result.stderr


def check_deploy(**env: str) -> None:
    """`manage.py check --deploy` with production settings fails on any warning."""
    result = _manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_SETTINGS_MODULE="config.settings.production",
        DJANGO_SECRET_KEY="a-long-random-production-secret-" + "q7Z" * 12,
        DJANGO_ALLOWED_HOSTS="jobs.example.com",
        FLOWER_BASIC_AUTH="admin:secret",
        # Nothing listens there: the fleet check (jobs.W020) must not read the machine's own Redis.
        REDIS_URL="redis://127.0.0.1:1/0",
        **env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_passes_check_deploy():
    check_deploy()


# --- Media storage ------------------------------------------------------------------------------

STORAGE_VARIABLES = [
    "STORAGE_BACKEND",
    "AWS_STORAGE_BUCKET_NAME",
    "AWS_S3_REGION_NAME",
    "AWS_S3_ENDPOINT_URL",
    "AWS_LOCATION",
    "AWS_S3_CUSTOM_DOMAIN",
    "AWS_S3_ADDRESSING_STYLE",
    "AWS_QUERYSTRING_AUTH",
    "AWS_QUERYSTRING_EXPIRE",
]


@pytest.fixture
def load_storage_settings(load_settings, monkeypatch):
    def load(module: str = "local", **environ: str):
        for name in STORAGE_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        return load_settings(module, **environ)

    return load


def test_media_is_on_the_filesystem_by_default(load_storage_settings):
    s = load_storage_settings()
    assert s.STORAGE_BACKEND == "filesystem"
    assert s.STORAGES["default"] == {"BACKEND": "django.core.files.storage.FileSystemStorage"}
    assert s.STORAGES["staticfiles"]["BACKEND"] == "whitenoise.storage.CompressedStaticFilesStorage"


def test_s3_storage_is_configured_from_the_environment_without_keys(load_storage_settings):
    s = load_storage_settings(
        "production",
        DJANGO_SECRET_KEY="k" * 50,
        STORAGE_BACKEND="S3",
        AWS_STORAGE_BUCKET_NAME="jobsite-media",
        AWS_S3_REGION_NAME="eu-central-1",
        AWS_S3_ENDPOINT_URL="https://minio.internal:9000",
        AWS_LOCATION="/media/",
        AWS_S3_ADDRESSING_STYLE="path",
        AWS_QUERYSTRING_EXPIRE="600",
        AWS_ACCESS_KEY_ID="AKIAEXAMPLEEXAMPLE",
        AWS_SECRET_ACCESS_KEY="secret-from-the-environment",
    )
    default = s.STORAGES["default"]
    assert default["BACKEND"] == "storages.backends.s3.S3Storage"
    options = default["OPTIONS"]
    assert options["bucket_name"] == "jobsite-media"
    assert options["region_name"] == "eu-central-1"
    assert options["endpoint_url"] == "https://minio.internal:9000"
    assert options["location"] == "media"
    assert options["custom_domain"] is None
    assert options["file_overwrite"] is True  # content-addressed names: an overwrite is the same bytes
    assert options["default_acl"] is None
    assert (options["querystring_auth"], options["querystring_expire"]) == (True, 600)
    config = options["client_config"]
    assert config.s3 == {"addressing_style": "path"}
    assert config.signature_version == "s3v4"
    assert (config.connect_timeout, config.read_timeout) == (5, 30)
    # Credentials stay with boto3's own lookup (environment, profile, IAM role), never in settings.
    assert not {"access_key", "secret_key", "security_token"} & set(options)
    assert "secret-from-the-environment" not in repr(s.STORAGES)

    # The backend accepts every option, and reads the keys from the environment itself.
    from storages.backends.s3 import S3Storage

    storage = S3Storage(**options)
    assert (storage.bucket_name, storage.location, storage.file_overwrite) == ("jobsite-media", "media", True)
    assert storage.access_key == "AKIAEXAMPLEEXAMPLE"


def test_s3_storage_needs_a_bucket(load_storage_settings):
    with pytest.raises(ImproperlyConfigured, match="AWS_STORAGE_BUCKET_NAME"):
        load_storage_settings(STORAGE_BACKEND="s3")


def test_unknown_storage_backend_is_refused(load_storage_settings):
    with pytest.raises(ImproperlyConfigured, match="STORAGE_BACKEND must be 'filesystem' or 's3'"):
        load_storage_settings(STORAGE_BACKEND="ftp")


def test_production_with_media_on_s3_passes_check_deploy():
    check_deploy(STORAGE_BACKEND="s3", AWS_STORAGE_BUCKET_NAME="jobsite-media", AWS_S3_REGION_NAME="eu-central-1")


def test_task_events_can_be_turned_off(load_settings, monkeypatch):
    monkeypatch.delenv("CELERY_TASK_EVENTS", raising=False)
    assert load_settings("local").CELERY_WORKER_SEND_TASK_EVENTS is True
    s = load_settings("local", CELERY_TASK_EVENTS="false")
    assert (s.CELERY_WORKER_SEND_TASK_EVENTS, s.CELERY_TASK_SEND_SENT_EVENT) == (False, False)


def test_the_worker_pool_is_chosen_per_process(load_settings):
    assert load_settings("local").CELERY_WORKER_POOL == "prefork"
    assert load_settings("local", CELERY_WORKER_POOL="threads").CELERY_WORKER_POOL == "threads"
    with pytest.raises(ImproperlyConfigured, match="CELERY_WORKER_POOL"):
        load_settings("local", CELERY_WORKER_POOL="fork")

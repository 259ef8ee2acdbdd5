"""The test suite's settings: fast, isolated, never pointed at a shared Redis.

The session fixture in tests/conftest.py starts a throw-away Redis and points the broker and the
cache at it; until then REDIS_URL names a port nothing listens on, so no test can reach the Redis
a developer or an operator runs.
"""

from config.env import use_profile

use_profile(
    DJANGO_DEBUG=False,
    LOG_FORMAT="json",
    REDIS_URL="redis://127.0.0.1:1/15",
    EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
)

import os  # noqa: E402

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-" + "x" * 40)

from config.settings.base import *  # noqa: E402, F403
from config.settings.base import DATABASES, VAR_DIR  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
SECURE_SSL_REDIRECT = False
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not :memory:, so a worker started by a test sees the same database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}
elif os.environ.get("TEST_DATABASE_SUFFIX"):
    # `make test` runs the fault suite beside the rest of the suite: a test database of its own.
    _name = DATABASES["default"]["NAME"]
    DATABASES["default"]["TEST"] = {"NAME": f"test_{_name}{os.environ['TEST_DATABASE_SUFFIX']}"}

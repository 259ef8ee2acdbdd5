"""The settings of the chaos run's processes (`DJANGO_SETTINGS_MODULE=tests.chaos.settings`): the test
settings, plus the start lease read from the environment (`JOBS_LEASE_SECONDS`), which the run
shortens so that a crash is noticed in seconds."""

from config.env import env
from config.settings.test import *  # noqa: F403

JOBS_LEASE_SECONDS = env.float("JOBS_LEASE_SECONDS", default=20.0)

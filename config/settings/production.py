"""Production: debug off, JSON logs, secrets without defaults (a missing one stops the boot)."""

from config.env import use_profile

use_profile(DJANGO_DEBUG=False)

from config.settings.base import *  # noqa: E402, F403 - settings modules extend base

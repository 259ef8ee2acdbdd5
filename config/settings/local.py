"""Development: debug on, readable console logs, SQLite and files under var/."""

from config.env import use_profile

use_profile(DJANGO_DEBUG=True)  # logs follow debug: console here, JSON when DJANGO_DEBUG=false

from config.settings.base import *  # noqa: E402, F403 - settings modules extend base

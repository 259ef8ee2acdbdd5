"""The only module that reads the process environment.

Settings modules call :func:`use_profile` before importing ``base`` to choose their own
defaults (debug on in ``local``, off in ``production``); a variable set in the environment
always wins over a profile default, whichever settings module is active.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

# An operator may keep variables in `.env` at the project root (docker compose reads the same file).
if env.bool("DJANGO_READ_DOT_ENV_FILE", default=False):  # pragma: no cover - opt-in
    env.read_env(str(BASE_DIR / ".env"))

_profile: dict[str, Any] = {}


def use_profile(**defaults: Any) -> None:
    """Set the defaults that the settings module about to be imported should use."""
    _profile.update(defaults)


def profile_default(name: str, fallback: Any) -> Any:
    """The active profile's default for `name`, else `fallback`."""
    return _profile.get(name, fallback)


def is_set(name: str) -> bool:
    """Whether the environment sets `name` to a non-empty value."""
    return bool(os.environ.get(name, "").strip())

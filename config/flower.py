"""Settings for `celery -A config flower`, applied through Flower's own FLOWER_* variables.

Flower shows task arguments and can revoke tasks, so outside debug it refuses to start without
basic auth; it keeps its state on disk so a restart does not forget the task history.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path


class FlowerConfigError(SystemExit):
    """Flower must not start: the message says why, on one line."""


def flower_environment(environ: MutableMapping[str, str], *, debug: bool, var_dir: Path) -> None:
    """Checks and completes the FLOWER_* variables in `environ` (in place)."""
    auth = environ.get("FLOWER_BASIC_AUTH", "").strip()
    if not auth and not debug:
        raise FlowerConfigError(
            "flower: FLOWER_BASIC_AUTH (user:password) must be set when DJANGO_DEBUG is false; refusing to start."
        )
    if auth and any(":" not in pair or pair.startswith(":") for pair in auth.split(",")):
        raise FlowerConfigError("flower: FLOWER_BASIC_AUTH must look like user:password (comma-separated for more).")
    if environ.get("FLOWER_UNAUTHENTICATED_API", "").lower() in {"1", "true", "yes"} and not debug:
        raise FlowerConfigError("flower: FLOWER_UNAUTHENTICATED_API is not allowed when DJANGO_DEBUG is false.")
    environ.setdefault("FLOWER_PERSISTENT", "True")
    environ.setdefault("FLOWER_DB", str(var_dir / "flower.db"))
    environ.setdefault("FLOWER_STATE_SAVE_INTERVAL", "60000")  # ms: also saved on shutdown
    environ.setdefault("FLOWER_MAX_TASKS", "20000")
    environ.setdefault("FLOWER_PURGE_OFFLINE_WORKERS", "3600")

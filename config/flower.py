"""Flower's settings for this site, read by `flowerconfig.py` (Flower's own configuration file,
which it loads from the working directory when `celery -A config flower` starts).

Flower shows task arguments and can revoke tasks, so outside debug it refuses to start without
basic auth; it keeps its state on disk so a restart does not forget the task history. A `FLOWER_*`
variable in the environment wins over each default here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class FlowerConfigError(SystemExit):
    """Flower must not start: the message says why, on one line."""


def flower_options(environ: Mapping[str, str], *, debug: bool, var_dir: Path) -> dict[str, Any]:
    """Flower's options for this site, after checking its authentication settings: the defaults
    below for every option the environment (`FLOWER_<NAME>`) does not set itself."""
    auth = environ.get("FLOWER_BASIC_AUTH", "").strip()
    if not auth and not debug:
        raise FlowerConfigError(
            "flower: FLOWER_BASIC_AUTH (user:password) must be set when DJANGO_DEBUG is false; refusing to start."
        )
    if auth and any(":" not in pair or pair.startswith(":") for pair in auth.split(",")):
        raise FlowerConfigError("flower: FLOWER_BASIC_AUTH must look like user:password (comma-separated for more).")
    if environ.get("FLOWER_UNAUTHENTICATED_API", "").lower() in {"1", "true", "yes"} and not debug:
        raise FlowerConfigError("flower: FLOWER_UNAUTHENTICATED_API is not allowed when DJANGO_DEBUG is false.")
    defaults: dict[str, Any] = {
        "persistent": True,
        "db": str(var_dir / "flower.db"),
        "state_save_interval": 60000,  # ms: also saved on shutdown
        "max_tasks": 20000,
        "purge_offline_workers": 3600,
    }
    return {name: value for name, value in defaults.items() if f"FLOWER_{name.upper()}" not in environ}

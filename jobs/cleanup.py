"""The periodic clean-up of old temporary files, and the checks that keep it inside its roots."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings

from jobs.conf import jobs_settings
from jobs.logging import get_logger

logger = get_logger(__name__)


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    skipped_symlinks: int = 0
    skipped_recent: int = 0
    refused_roots: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "removed": len(self.removed),
            "bytes_freed": self.bytes_freed,
            "skipped_symlinks": self.skipped_symlinks,
            "skipped_recent": self.skipped_recent,
            "refused_roots": self.refused_roots,
            "files": self.removed[:100],
        }


def cleanup_roots() -> list[Path]:
    """The directories temporary files are cleaned in: `JOBS_TEMP_ROOT` and the upload temp dir."""
    roots = [Path(jobs_settings.TEMP_ROOT)] if jobs_settings.TEMP_ROOT else []
    if settings.FILE_UPLOAD_TEMP_DIR:
        roots.append(Path(settings.FILE_UPLOAD_TEMP_DIR))
    unique: list[Path] = []
    for root in roots:
        if root.resolve() not in [r.resolve() for r in unique]:
            unique.append(root)
    return unique


def _protected_paths() -> list[tuple[str, Path]]:
    """What no cleanup root may be or contain: the project, its data and the home directory."""
    paths: list[tuple[str, Any]] = [
        ("the project (BASE_DIR)", getattr(settings, "BASE_DIR", None)),
        ("VAR_DIR", getattr(settings, "VAR_DIR", None)),
        ("MEDIA_ROOT", settings.MEDIA_ROOT),
        ("STATIC_ROOT", getattr(settings, "STATIC_ROOT", None)),
    ]
    database = settings.DATABASES.get("default", {})
    name = str(database.get("NAME") or "")
    if database.get("ENGINE", "").endswith("sqlite3") and name and name != ":memory:" and not name.startswith("file:"):
        paths.append(("the SQLite database", name))
    with contextlib.suppress(RuntimeError):  # no home directory to find
        paths.append(("the home directory", Path.home()))
    return [(what, Path(path).resolve()) for what, path in paths if path]


def cleanup_root_danger(root: Path | str) -> str | None:
    """Why cleaning `root` would destroy real data, or None.

    Paths are compared resolved (symlinks, `..`): dangerous are a filesystem root, and a root
    that is, or contains at any depth, the project, its data (VAR_DIR, MEDIA_ROOT, STATIC_ROOT,
    an SQLite database) or the home directory. A root inside MEDIA_ROOT is not: only what is
    below the root is cleaned."""
    resolved = Path(root).resolve()
    if resolved == Path(resolved.anchor):
        return f"{resolved} is a filesystem root"
    for what, path in _protected_paths():
        if path == resolved:
            return f"{resolved} is {what}"
        if resolved in path.parents:
            return f"{resolved} contains {what} ({path})"
    return None


def cleanup_root_problem(root: Path | str) -> str | None:
    """Why the cleanup refuses `root`, or None: a danger (above), or a top-level directory such
    as `/tmp` or `/var`, shared with everything else on the machine."""
    danger = cleanup_root_danger(root)
    if danger:
        return danger
    resolved = Path(root).resolve()
    return f"{resolved} is a top-level directory" if len(resolved.parts) < 3 else None


def temp_files_cleanup(*, roots: list[Path], max_age: timedelta, dry_run: bool = False) -> CleanupReport:
    """Removes regular files older than `max_age` under each root, and then empty directories.

    Never follows or removes symlinks, never touches anything outside a root (paths are checked
    after resolving), skips files modified within `max_age` (still being written) and re-checks
    a file's modification time right before removing it.
    """
    report = CleanupReport()
    cutoff = time.time() - max_age.total_seconds()
    for root in roots:
        if not root.is_dir() or root.is_symlink():
            continue
        problem = cleanup_root_problem(root)
        if problem:
            report.refused_roots.append(str(root))
            logger.error("cleanup.refused_root", extra={"root": str(root), "problem": problem})
            continue
        real_root = root.resolve()
        for dirpath, _dirnames, filenames in os.walk(real_root, topdown=False, followlinks=False):
            current = Path(dirpath)
            for name in filenames:
                _consider(current / name, real_root, cutoff, dry_run, report)
            if current != real_root:
                _remove_empty_dir(current, cutoff, dry_run)
    logger.info("cleanup.done", extra={k: v for k, v in report.as_dict().items() if k != "files"})
    return report


def _consider(path: Path, real_root: Path, cutoff: float, dry_run: bool, report: CleanupReport) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        report.skipped_symlinks += 1
        return
    if not stat.S_ISREG(info.st_mode):
        return
    if info.st_mtime >= cutoff:
        report.skipped_recent += 1
        return
    if real_root not in path.resolve().parents:
        return  # pragma: no cover - os.walk without followlinks cannot leave the root
    if dry_run:
        report.removed.append(str(path))
        report.bytes_freed += info.st_size
        return
    try:
        again = path.lstat()
        if again.st_mtime != info.st_mtime or stat.S_ISLNK(again.st_mode):
            report.skipped_recent += 1
            return
        path.unlink()
    except FileNotFoundError:
        return
    report.removed.append(str(path))
    report.bytes_freed += info.st_size


def _remove_empty_dir(path: Path, cutoff: float, dry_run: bool) -> None:
    try:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode) or info.st_mtime >= cutoff or dry_run:
            return
        path.rmdir()  # fails, harmlessly, when not empty
    except OSError:
        return

"""Housekeeping services run by the periodic tasks: temporary-file cleanup and the daily report."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, DurationField, ExpressionWrapper, F
from django.utils import timezone

from jobs.conf import jobs_settings

if TYPE_CHECKING:
    from jobs.models import DailyReport

logger = logging.getLogger("jobs.housekeeping")


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


# --- daily report -------------------------------------------------------------------------------

RETRIES_KEY = "jobs:stats:retries:{day}"


def retry_count_add(task_name: str) -> None:
    """Counts one retry of `task_name` for today's report (best effort)."""
    key = RETRIES_KEY.format(day=timezone.now().date().isoformat())
    try:
        counts = cache.get(key) or {}
        counts[task_name] = counts.get(task_name, 0) + 1
        cache.set(key, counts, timeout=3 * 24 * 3600)
    except Exception:
        logger.debug("report.retry_count_failed", exc_info=True)


def daily_report_build(*, end: datetime | None = None) -> dict[str, Any]:
    """Counts over the 24 hours before `end`: tasks by name and state (django-celery-results),
    retries, dead letters created, and the slowest tasks."""
    from django_celery_results.models import TaskResult

    from jobs.models import DeadLetter

    end = end or timezone.now()
    start = end - timedelta(hours=24)
    results = TaskResult.objects.filter(date_done__gte=start, date_done__lt=end)
    by_task: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for row in results.values("task_name", "status").annotate(n=Count("id")).order_by():
        name = row["task_name"] or "<unknown>"
        by_task.setdefault(name, {})[row["status"]] = row["n"]
        totals[row["status"]] = totals.get(row["status"], 0) + row["n"]
    # The ten longest runs, picked by the database (never a row per run in this process); ties
    # in the results' own order, latest done first.
    duration = ExpressionWrapper(F("date_done") - F("date_created"), output_field=DurationField())
    longest = (
        results.exclude(date_created__isnull=True)
        .annotate(duration=duration)
        .order_by("-duration", "-date_done", "-pk")
        .values("task_name", "task_id", "date_created", "date_done")[:10]
    )
    slowest = [
        {
            "task_name": row["task_name"],
            "task_id": row["task_id"],
            "seconds": round((row["date_done"] - row["date_created"]).total_seconds(), 3),
        }
        for row in longest
    ]
    retries: dict[str, int] = {}
    for day in {start.date(), end.date()}:
        for name, n in (cache.get(RETRIES_KEY.format(day=day.isoformat())) or {}).items():
            retries[name] = retries.get(name, 0) + n
    dead = DeadLetter.objects.filter(failed_at__gte=start, failed_at__lt=end)
    dead_by_task = {
        r["task_name"]: r["n"] for r in dead.values("task_name").annotate(n=Count("id")).order_by("task_name")
    }
    return {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "totals": totals,
        "by_task": by_task,
        "retries": retries,
        "dead_letters_created": sum(dead_by_task.values()),
        "dead_letters_by_task": dead_by_task,
        "slowest": slowest,
    }


def daily_report_text(data: dict[str, Any]) -> str:
    lines = [f"Task report {data['start'][:16]} .. {data['end'][:16]} UTC", ""]
    totals = ", ".join(f"{state.lower()} {n}" for state, n in sorted(data["totals"].items())) or "no tasks"
    lines += [
        f"All tasks: {totals}",
        f"Retries: {sum(data['retries'].values())}",
        f"Dead letters created: {data['dead_letters_created']}",
        "",
        "By task:",
    ]
    for name, states in sorted(data["by_task"].items()):
        counts = ", ".join(f"{state.lower()} {n}" for state, n in sorted(states.items()))
        lines.append(f"  {name}: {counts}; retries {data['retries'].get(name, 0)}")
    if data["slowest"]:
        lines += ["", "Slowest:"]
        lines += [f"  {r['seconds']:>9.3f} s  {r['task_name']}  {r['task_id']}" for r in data["slowest"]]
    return "\n".join(lines)


def daily_report_create(*, day: date | None = None, mail: bool = True) -> DailyReport:
    """Builds, stores (one row per day, replaced when rebuilt) and mails the report."""
    from django.core.mail import send_mail

    from jobs.models import DailyReport

    now = timezone.now()
    day = day or (now - timedelta(minutes=5)).date()
    data = daily_report_build(end=now)
    text = daily_report_text(data)
    report, _ = DailyReport.objects.update_or_create(day=day, defaults={"data": data, "text": text})
    if mail and jobs_settings.DEAD_LETTER_ALERT_EMAILS:
        try:
            send_mail(
                subject=f"[jobs] daily task report {day.isoformat()}",
                message=text,
                from_email=settings.DEFAULT_FROM_EMAIL,
                recipient_list=jobs_settings.DEAD_LETTER_ALERT_EMAILS,
            )
        except Exception:
            logger.exception("report.mail_failed")
    logger.info("report.created", extra={"day": day.isoformat(), "dead_letters_created": data["dead_letters_created"]})
    return report

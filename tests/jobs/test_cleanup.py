"""The clean-up of old temporary files: what it removes, the roots it refuses, its system check."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from jobs.cleanup import cleanup_roots, temp_files_cleanup
from jobs.tasks import cleanup_temp_files

DAY = timedelta(hours=24)


def make(path, age_hours=0.0, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    when = time.time() - age_hours * 3600
    os.utime(path, (when, when))
    return path


def test_cleanup_removes_only_old_regular_files_inside_the_root(tmp_path):
    root = tmp_path / "tmp"
    outside = make(tmp_path / "outside" / "precious.txt", age_hours=100)
    old = make(root / "old.upload", age_hours=30, content=b"12345")
    nested_old = make(root / "a" / "b" / "old.part", age_hours=30)
    fresh = make(root / "being-written.upload", age_hours=0.1)
    (root / "link-to-outside").symlink_to(outside)
    os.utime(root / "link-to-outside", (0, 0), follow_symlinks=False)
    (root / "dir-link").symlink_to(outside.parent, target_is_directory=True)

    report = temp_files_cleanup(roots=[root], max_age=DAY)

    assert sorted(report.removed) == sorted([str(old), str(nested_old)])
    assert report.bytes_freed == 6
    assert fresh.exists()
    assert outside.exists()  # neither the file link nor the directory link was followed
    assert (root / "link-to-outside").is_symlink()
    assert report.skipped_symlinks == 1
    assert report.skipped_recent == 1


def test_cleanup_dry_run_removes_nothing(tmp_path):
    old = make(tmp_path / "tmp" / "old", age_hours=48)
    report = temp_files_cleanup(roots=[tmp_path / "tmp"], max_age=DAY, dry_run=True)
    assert report.removed == [str(old)]
    assert old.exists()


def test_cleanup_refuses_dangerous_roots(settings, tmp_path):
    precious = make(settings.MEDIA_ROOT / "photo.jpg", age_hours=100)
    report = temp_files_cleanup(roots=[settings.MEDIA_ROOT, tmp_path / "missing"], max_age=DAY)
    assert report.refused_roots == [str(settings.MEDIA_ROOT)]
    assert precious.exists()


@pytest.mark.parametrize("inside", ["media", "deep/down/media", "."])
def test_cleanup_refuses_a_root_that_holds_the_media(settings, inside):
    settings.MEDIA_ROOT = (settings.TEMP_ROOT / inside).resolve()
    precious = make(settings.MEDIA_ROOT / "photo.jpg", age_hours=100)
    report = temp_files_cleanup(roots=[settings.TEMP_ROOT], max_age=DAY)
    assert report.refused_roots == [str(settings.TEMP_ROOT)]
    assert precious.exists()


def test_cleanup_compares_resolved_paths(settings, tmp_path):
    real_media = make(settings.TEMP_ROOT / "uploads" / "photo.jpg", age_hours=100).parent
    (tmp_path / "media-link").symlink_to(real_media, target_is_directory=True)
    settings.MEDIA_ROOT = tmp_path / "media-link"  # looks elsewhere, lives inside the temp root
    report = temp_files_cleanup(roots=[tmp_path / "media" / ".." / "tmp"], max_age=DAY)
    assert report.refused_roots == [str(tmp_path / "media" / ".." / "tmp")]
    assert (real_media / "photo.jpg").exists()


@pytest.mark.parametrize("protected", ["BASE_DIR", "VAR_DIR", "STATIC_ROOT"])
def test_cleanup_refuses_a_root_that_holds_the_project_or_its_data(settings, protected):
    setattr(settings, protected, settings.TEMP_ROOT / "inside")
    precious = make(settings.TEMP_ROOT / "inside" / "manage.py", age_hours=100)
    report = temp_files_cleanup(roots=[settings.TEMP_ROOT], max_age=DAY)
    assert report.refused_roots == [str(settings.TEMP_ROOT)]
    assert precious.exists()


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_cleanup_refuses_a_root_that_holds_the_sqlite_database(settings):
    database = make(settings.TEMP_ROOT / "db" / "db.sqlite3", age_hours=100)
    settings.DATABASES = {
        "default": {**settings.DATABASES["default"], "ENGINE": "django.db.backends.sqlite3", "NAME": str(database)}
    }
    report = temp_files_cleanup(roots=[settings.TEMP_ROOT], max_age=DAY)
    assert report.refused_roots == [str(settings.TEMP_ROOT)]
    assert database.exists()


def test_unsafe_root_reasons(settings, tmp_path):
    from jobs.cleanup import cleanup_root_problem

    assert "filesystem root" in cleanup_root_problem(Path("/"))
    assert cleanup_root_problem(Path("/tmp")) is not None  # a shared top-level directory
    assert cleanup_root_problem(Path(settings.BASE_DIR)) is not None
    assert cleanup_root_problem(Path(settings.BASE_DIR).parent / "..") is not None
    assert cleanup_root_problem(settings.TEMP_ROOT) is None
    assert cleanup_root_problem(settings.MEDIA_ROOT) is not None


def test_cleanup_may_clean_a_temp_dir_inside_the_media(settings):
    """Only media at or below a cleanup root is at risk; a temp dir of its own inside
    MEDIA_ROOT deletes nothing else."""
    photo = make(settings.MEDIA_ROOT / "photo.jpg", age_hours=100)
    stale = make(settings.MEDIA_ROOT / "tmp" / "stale.upload", age_hours=100)
    report = temp_files_cleanup(roots=[settings.MEDIA_ROOT / "tmp"], max_age=DAY)
    assert report.refused_roots == []
    assert report.removed == [str(stale)]
    assert photo.exists()


def test_cleanup_task_uses_the_configured_roots(settings):
    settings.FILE_UPLOAD_TEMP_DIR = str(settings.TEMP_ROOT)
    settings.JOBS_CLEANUP_MAX_AGE_HOURS = 1
    assert cleanup_roots() == [settings.TEMP_ROOT]
    make(settings.TEMP_ROOT / "stale", age_hours=2)
    make(settings.TEMP_ROOT / "new")
    assert cleanup_temp_files()["removed"] == 1

"""The web's /metrics when gunicorn runs several worker processes (prometheus_client's multiprocess mode).

Each gunicorn worker counts only the requests it served. With `PROMETHEUS_MULTIPROC_DIR` set
(`config/gunicorn.py` sets it for the web, and only for the web), every process writes its metric
values to files in that directory, and a scrape adds them up, whichever worker answers it.

A worker that exits (`--max-requests` recycles them) leaves its counter and histogram files
behind: they hold requests that happened. The gunicorn master folds them into one
`<type>_archive.db` per type (`process_exited`, from gunicorn's `child_exit` hook), so the directory
holds the live workers' files plus the archives, however often workers are replaced. A scrape reads the
files under a shared lock and the fold runs under an exclusive one, so no scrape sees a dead
worker's counts twice or not at all (Prometheus would take either for a counter reset).

Nothing imports Django at module level: the gunicorn master uses this module without loading the project.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

LOCK_FILE = "fold.lock"  # not *.db: prometheus_client reads every *.db file of the directory
FOLDED_TYPES = ("counter", "histogram", "summary")  # values that add up across processes


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, or None when it is off (the
    lowercase name is its deprecated spelling, which it still honours)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None  # noqa: SIM112


@contextmanager
def directory_lock(path: str, *, exclusive: bool) -> Iterator[None]:
    """flock on the directory's lock file: shared for scrapes, exclusive for a fold."""
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def empty_directory(path: str) -> None:
    """Creates `path` if needed and removes the metric files of an earlier run (only `*.db`: the
    directory may be a mount point, or something an operator pointed at by mistake)."""
    os.makedirs(path, exist_ok=True)
    for name in glob.glob(os.path.join(glob.escape(path), "*.db")):
        os.remove(name)


def process_exited(pid: int, path: str | None = None) -> None:
    """Bookkeeping after process `pid` exited: drops its live gauges (prometheus_client's
    `mark_process_dead`) and folds its counters, histograms and summaries into the archive files."""
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict

    path = path or multiprocess_dir()
    if not path:
        return
    with directory_lock(path, exclusive=True):
        multiprocess.mark_process_dead(pid, path)
        for typ in FOLDED_TYPES:
            source = os.path.join(path, f"{typ}_{pid}.db")
            if not os.path.exists(source):
                continue
            archive = os.path.join(path, f"{typ}_archive.db")
            # Written aside and renamed: a failure half-way leaves the archive as it was, and the
            # dead process's file stays, so nothing is counted twice or lost.
            staging = f"{archive}.tmp"
            if os.path.exists(archive):
                shutil.copyfile(archive, staging)
            elif os.path.exists(staging):
                os.remove(staging)
            merged = MmapedDict(staging)
            try:
                for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(source):
                    total, _ = merged.read_value(key)
                    merged.write_value(key, total + value, 0.0)
            finally:
                merged.close()
            os.replace(staging, archive)
            os.remove(source)


def metrics_page() -> tuple[bytes, str]:
    """The body and content type of the web's /metrics: django-prometheus's metrics (summed over
    every process when multiprocess mode is on) plus `jobs.metrics.JobsCollector`'s scrape-time gauges."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from jobs.metrics import JobsCollector, register_web_collector

    path = multiprocess_dir()
    if path is None:
        register_web_collector()
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    # Only what the processes wrote to the directory: the default registry's collectors would
    # report this one process (and its process_* metrics are per process anyway).
    processes = CollectorRegistry()
    MultiProcessCollector(processes, path=path)
    with directory_lock(path, exclusive=False):
        body = generate_latest(processes)
    # Computed at scrape time, outside the lock: a slow broker must not hold up the master's folds.
    scrape_time = CollectorRegistry()
    scrape_time.register(JobsCollector())
    return body + generate_latest(scrape_time), CONTENT_TYPE_LATEST

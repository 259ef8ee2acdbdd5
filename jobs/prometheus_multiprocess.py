"""The web's /metrics when several processes serve it (prometheus_client's multiprocess mode).

With `PROMETHEUS_MULTIPROC_DIR` set, every web process writes its metric values to files in that
directory, and a scrape adds them up, whichever process answers it. A server that replaces its
processes folds an exited one's files into archive files under the directory's exclusive lock
(this site: `config/prometheus_multiprocess.py`, from gunicorn's hooks); a scrape reads them under
the shared one, so it never sees an exited process's counts twice or not at all.

Nothing imports Django at module level: a gunicorn master uses this module without loading the project.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

LOCK_FILE = "fold.lock"  # not *.db: prometheus_client reads every *.db file of the directory


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
    MultiProcessCollector(processes, path=path)  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
    with directory_lock(path, exclusive=False):
        body = generate_latest(processes)
    # Computed at scrape time, outside the lock: a slow broker must not hold up the master's folds.
    scrape_time = CollectorRegistry()
    scrape_time.register(JobsCollector())
    return body + generate_latest(scrape_time), CONTENT_TYPE_LATEST

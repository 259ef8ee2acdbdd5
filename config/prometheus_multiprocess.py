"""The gunicorn side of prometheus_client's multiprocess mode for the web's /metrics.

Each gunicorn worker counts only the requests it served. With `PROMETHEUS_MULTIPROC_DIR` set
(`config/gunicorn.py` sets it for the web, and only for the web), every process writes its metric
values to files in that directory, and a scrape (`jobs.prometheus_multiprocess.metrics_page`) adds
them up, whichever worker answers it.

A worker that exits (`--max-requests` recycles them) leaves its counter and histogram files
behind: they hold requests that happened. The gunicorn master folds them into one
`<type>_archive.db` per type (`process_exited`, from gunicorn's `child_exit` hook), so the directory
holds the live workers' files plus the archives, however often workers are replaced. A scrape reads
the files under a shared lock and the fold runs under an exclusive one, so no scrape sees a dead
worker's counts twice or not at all (Prometheus would take either for a counter reset).

Nothing imports Django: the gunicorn master uses this module without loading the project.
"""

from __future__ import annotations

import glob
import os
import shutil

from jobs.prometheus_multiprocess import directory_lock, multiprocess_dir

FOLDED_TYPES = ("counter", "histogram", "summary")  # values that add up across processes


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

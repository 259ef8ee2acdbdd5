"""gunicorn settings of the web process: prometheus_client's multiprocess mode for /metrics.

The image's command passes it (`gunicorn config.wsgi --config /app/config/gunicorn.py ...`); every
other setting stays on that command line. Without it each gunicorn worker keeps its own counters and
a scrape of /metrics reports whichever worker answered. With it:

- `PROMETHEUS_MULTIPROC_DIR` is set here, in the master, before anything imports prometheus_client
  (it chooses file-backed values at import), so the workers forked from it inherit it. It is set for
  this process tree only: Celery workers, beat and `manage.py` never get it from here (a Celery
  worker must not run in multiprocess mode: jobs/metrics.py counts in its main process). A value
  given in the environment wins (compose and Kubernetes put it on a tmpfs); else a private
  directory is created under the temporary directory and removed at exit.
- `on_starting` empties the directory: counts of an earlier run must not come back.
- `child_exit` folds an exited worker's files into the archive files (config.prometheus_multiprocess).

gunicorn reads every module-level name of this file as a setting: helpers are underscored.
"""

import os as _os
import shutil as _shutil
import sys as _sys
import tempfile as _tempfile
from pathlib import Path as _Path

# gunicorn loads this file by path; the hooks import config.prometheus_multiprocess from the checkout.
_BASE_DIR = str(_Path(__file__).resolve().parent.parent)
if _BASE_DIR not in _sys.path:
    _sys.path.insert(0, _BASE_DIR)

_PRIVATE_PREFIX = "jobsite-prometheus-"
# The lowercase name is prometheus_client's deprecated spelling, which it still honours.
# The web's publishes wait at most 2 s for a broker that stopped answering, and do not retry on a
# timeout (the workers keep 15 s): with the outbox's breaker (JOBS_PUBLISH_BREAKER_SECONDS), no
# request hangs on a broker the network lost.
_os.environ.setdefault("CELERY_BROKER_SOCKET_TIMEOUT", "2")

if not (_os.environ.get("PROMETHEUS_MULTIPROC_DIR") or _os.environ.get("prometheus_multiproc_dir")):  # noqa: SIM112
    _os.environ["PROMETHEUS_MULTIPROC_DIR"] = _tempfile.mkdtemp(prefix=_PRIVATE_PREFIX)


def on_starting(server):
    from config.prometheus_multiprocess import empty_directory
    from jobs.prometheus_multiprocess import multiprocess_dir

    if getattr(server, "master_pid", 0):
        # A re-executed master (USR2 upgrade): the old master's workers still serve and write here.
        return
    empty_directory(multiprocess_dir())


def child_exit(server, worker):
    from config.prometheus_multiprocess import process_exited

    try:
        process_exited(worker.pid)
    except Exception:  # the master must outlive a failed metrics bookkeeping
        server.log.exception("prometheus: could not fold the metric files of worker %s", worker.pid)


def on_exit(server):
    from jobs.prometheus_multiprocess import multiprocess_dir

    if getattr(server, "reexec_pid", 0):
        return  # the new master (USR2) inherited the directory and keeps using it
    path = multiprocess_dir()
    if path and _Path(path).parent == _Path(_tempfile.gettempdir()) and _Path(path).name.startswith(_PRIVATE_PREFIX):
        _shutil.rmtree(path, ignore_errors=True)

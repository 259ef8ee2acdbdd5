"""django-celery-results' database backend, for a database that restarts.

Celery writes task results (STARTED, RETRY, SUCCESS, FAILURE) outside the task's own code, in the
pool process and in the worker's main process. With the stock backend, a connection the database
cut (a restart, a failover) fails that write, and Celery turns the failure into the task's:
a job that succeeded, or that had just scheduled its retry, was dead-lettered. Here a connection
error is retried on a new connection (Celery's `result_backend_always_retry`, a few times with
backoff), and a result that still cannot be written is logged and dropped: results are history,
the job's truth is in the app's rows, the ledger and the dead letters.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import BackendStoreError
from django.db import Error as DatabaseError
from django.db import InterfaceError, OperationalError, connection
from django_celery_results.backends.database import DatabaseBackend as StockDatabaseBackend

logger = logging.getLogger("jobs.results")


class DatabaseBackend(StockDatabaseBackend):
    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        if isinstance(exc, InterfaceError | OperationalError):
            try:
                connection.close()  # the next try connects afresh
            except DatabaseError:
                logger.debug("results.close_failed", exc_info=True)
            return True
        return super().exception_safe_to_retry(exc)

    def store_result(self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None,
                     **kwargs: Any) -> Any:  # fmt: skip
        try:
            return super().store_result(task_id, result, state, traceback=traceback, request=request, **kwargs)
        except (BackendStoreError, DatabaseError) as exc:
            logger.warning(
                "results.not_stored",
                extra={"task_id": task_id, "state": state, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            return result

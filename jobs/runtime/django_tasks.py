"""Django's `@task` functions on the Celery workers, each run as a `JobTask`.

`jobs.backends.CeleryBackend` registers every `@task` function it validates as a Celery task named
by the function's module path, built on `DjangoTaskRunner`: the retry policy and backoff,
transient and permanent errors, dead letters, crash-loop quarantine, request ids, logs and metrics
of every other job come with it. Its per-task options (`jobs.backends.task_options`, `@task(...)`
keywords on Django 6.1 and the backport, the backend's `OPTIONS["TASKS"]`) become the runner's.

A job's history travels with its message, so recording it costs no write of its own:
- `jobs_enqueued_at`: when `enqueue` was called (ISO 8601); `jobs_task_backend`: the alias it was
  enqueued through;
- `jobs_attempts`: one entry per earlier attempt (the worker, when it started, the error it
  raised), added to the retry's message.
Each attempt puts them, with the job's arguments, in its request's `meta`, which the task history
(django-celery-results' table, written in batches by `jobs.runtime.results`) stores with every state
the attempt reaches. `jobs.backends.CeleryBackend.get_result` reads them back.
"""

from __future__ import annotations

import traceback as traceback_module
from datetime import datetime
from functools import cache
from typing import Any

from celery import Celery, shared_task
from django.utils import timezone
from django.utils.module_loading import import_string

from jobs.exceptions import PermanentError
from jobs.runtime.results import DatabaseBackend
from jobs.runtime.task import JobTask
from jobs.tasks_compat import (
    Task,
    TaskContext,
    TaskError,
    TaskResult,
    TaskResultStatus,
    normalize_json,
    task_finished,
    task_started,
)

ENQUEUED_HEADER = "jobs_enqueued_at"
BACKEND_HEADER = "jobs_task_backend"
ATTEMPTS_HEADER = "jobs_attempts"
#: What the job's `Task` was enqueued with (`Task.using()`), so its result names the same Task.
PRIORITY_HEADER = "jobs_task_priority"
QUEUE_NAME_HEADER = "jobs_task_queue_name"
RUN_AFTER_HEADER = "jobs_task_run_after"
#: The key of a task history row's `meta` that holds a Django task's record.
META_KEY = "django_task"
#: An attempt's traceback is kept to this many characters (its end: where it was raised); an
#: earlier one's, carried in the next attempt's message headers, to `EARLIER_TRACEBACK_KEPT`.
TRACEBACK_KEPT = 4000
EARLIER_TRACEBACK_KEPT = 1000
#: At most this many earlier attempts are carried (the first and the latest ones): with the
#: limits above, about 25 KB of headers at most (RabbitMQ's frame is 128 KB).
ATTEMPTS_KEPT = 20

#: The options a task may set, and the runner's attribute each one becomes.
OPTION_ATTRIBUTES = {
    "max_retries": "retry_limit",
    "backoff_base": "backoff_base",
    "backoff_max": "backoff_max",
    "transient_errors": "transient_errors",
    "permanent_errors": "permanent_errors",
    "time_limit": "time_limit",
    "soft_time_limit": "soft_time_limit",
    "alert_on_dead_letter": "alert_on_dead_letter",
    "limits": "limits",
    "unique": "unique",
}


def error_path(exc_type: type[BaseException]) -> str:
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


def attempt_error(exc: BaseException) -> dict[str, str]:
    """An attempt's error as the history keeps it (Django's `TaskError` fields)."""
    text = "".join(traceback_module.format_exception(exc))
    return {"exception_class_path": error_path(type(exc)), "traceback": text[-TRACEBACK_KEPT:]}


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


@cache
def results_backend(app: Celery) -> DatabaseBackend:
    """Where a Django task's states are written, whatever result backend the project's Celery
    app has: the task history table `get_result` reads."""
    return DatabaseBackend(app=app)


def history_decode(row: Any, content: Any) -> Any:
    """A value of a task history row (its result or meta), decoded as it was encoded."""
    from celery import current_app

    app = current_app._get_current_object()  # type: ignore[attr-defined] # a Proxy; celery-types omit it
    return results_backend(app).decode_content(row, content)


class DjangoTaskRunner(JobTask):
    """Runs one `@task` function (the module path this task is named by) on a worker."""

    abstract = True
    ignore_result = False  # the task history is what `get_result` reads
    track_started = True  # RUNNING, with the time it started
    typing = False  # the function's own signature is checked by calling it
    #: The ledger row goes with the batch that writes the result (`get_result` reads one or the other).
    ledger_after_result = True

    @property  # type: ignore[override]
    def backend(self) -> DatabaseBackend:
        return results_backend(self.app)

    @backend.setter
    def backend(self, value: Any) -> None:  # Celery assigns it in some paths; ours stays
        pass

    # --- the function behind the task -----------------------------------------------------

    def django_task(self) -> Task[..., Any]:
        """The `Task` object the module path names (what `@task` put in its module)."""
        found = import_string(self.name)
        if not isinstance(found, Task):
            raise PermanentError(f"{self.name} is not a @task function any more")
        return found

    @property
    def limits_function(self) -> Any:
        """The function whose parameters name the arguments limit keys are made of."""
        return arguments_signature(self.django_task())

    # --- an attempt ---------------------------------------------------------------------------

    def attempt_starting(self) -> None:
        request = self.request
        earlier = list(getattr(request, ATTEMPTS_HEADER, None) or [])
        now = timezone.now()
        request.meta = {  # type: ignore[attr-defined] # django-celery-results stores it with the state
            META_KEY: {
                "task": self.name,
                "backend": getattr(request, BACKEND_HEADER, None) or "default",
                "priority": getattr(request, PRIORITY_HEADER, None),
                "queue_name": getattr(request, QUEUE_NAME_HEADER, None),
                "run_after": getattr(request, RUN_AFTER_HEADER, None),
                "args": list(request.args or ()),
                "kwargs": dict(request.kwargs or {}),
                "enqueued_at": getattr(request, ENQUEUED_HEADER, None),
                "attempts": [*earlier, {"worker": request.hostname or "", "started_at": now.isoformat()}],
            }
        }

    def retry_headers(self, request: Any, exc: BaseException) -> dict[str, Any]:
        record = (getattr(request, "meta", None) or {}).get(META_KEY) or {}
        attempts = [dict(entry) for entry in record.get("attempts") or []]
        for entry in attempts:
            error = entry.get("error")
            if error and len(error.get("traceback", "")) > EARLIER_TRACEBACK_KEPT:
                entry["error"] = {**error, "traceback": error["traceback"][-EARLIER_TRACEBACK_KEPT:]}
        if len(attempts) > ATTEMPTS_KEPT:
            attempts = attempts[:1] + attempts[-(ATTEMPTS_KEPT - 1) :]
        return {ATTEMPTS_HEADER: attempts}

    def run_function(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            task = self.django_task()
            result = self.attempt_result(task, TaskResultStatus.RUNNING)
            task_started.send(sender=type(task.get_backend()), task_result=result)
            if task.takes_context:
                value = task.call(TaskContext(task_result=result), *args, **kwargs)
            else:
                value = task.call(*args, **kwargs)
            # What the history can hold (a tuple becomes a list); anything else fails the job.
            return normalize_json(value)
        except BaseException as exc:
            self._note_error(exc)
            raise

    def _note_error(self, exc: BaseException) -> None:
        """The attempt's error, in the record its RETRY or FAILURE state is stored with."""
        record = (getattr(self.request, "meta", None) or {}).get(META_KEY)
        if record and record.get("attempts"):
            record["attempts"][-1]["error"] = attempt_error(exc)

    def attempt_result(
        self, task: Task[..., Any], status: str, *, value: Any = None, error: BaseException | None = None
    ) -> TaskResult[Any, Any]:
        """This attempt's `TaskResult`, built from the request (no read): for the context and
        the signals."""
        request = self.request
        record = (getattr(request, "meta", None) or {}).get(META_KEY) or {}
        attempts = record.get("attempts") or []
        errors = [TaskError(**entry["error"]) for entry in attempts if entry.get("error")]
        if error is not None and not (attempts and attempts[-1].get("error")):
            errors.append(TaskError(**attempt_error(error)))
        finished = status in {TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED}
        started = [parse_time(entry.get("started_at")) for entry in attempts]
        result: TaskResult[Any, Any] = TaskResult(
            task=task,
            id=str(request.id),
            status=TaskResultStatus(status),
            enqueued_at=parse_time(record.get("enqueued_at")),
            started_at=started[0] if started else None,
            last_attempted_at=started[-1] if started else None,
            finished_at=timezone.now() if finished else None,
            args=list(request.args or ()),
            kwargs=dict(request.kwargs or {}),
            backend=record.get("backend") or task.backend,
            errors=errors,
            worker_ids=[entry.get("worker") or "" for entry in attempts],
        )
        if status == TaskResultStatus.SUCCESSFUL:
            object.__setattr__(result, "_return_value", value)
        return result

    # --- the end --------------------------------------------------------------------------------

    def on_success(self, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        task = self.django_task()
        result = self.attempt_result(task, TaskResultStatus.SUCCESSFUL, value=retval)
        task_finished.send(sender=type(task.get_backend()), task_result=result)

    def on_failure(
        self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], einfo: Any
    ) -> None:
        super().on_failure(exc, task_id, args, kwargs, einfo)  # the dead letter first
        try:
            task = self.django_task()
        except Exception:  # noqa: BLE001 - the function is gone: its dead letter says so
            return
        result = self.attempt_result(task, TaskResultStatus.FAILED, error=exc)
        task_finished.send(sender=type(task.get_backend()), task_result=result)


def _run(self: DjangoTaskRunner, *args: Any, **kwargs: Any) -> Any:
    return self.run_function(args, kwargs)


_run.__name__ = _run.__qualname__ = "run"
#: The options of each registered module path (what `register` was last given).
_options: dict[str, dict[str, Any]] = {}


def arguments_signature(task: Task[..., Any]) -> Any:
    """A stand-in for the `@task` function whose signature has the parameters its job's
    arguments fill: without `context` for a task that takes one (the runner passes it)."""
    import inspect

    signature = inspect.signature(task.func)
    if getattr(task, "takes_context", False):
        parameters = list(signature.parameters.values())[1:]
        signature = signature.replace(parameters=parameters)

    def arguments(*args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
        pass

    arguments.__signature__ = signature  # type: ignore[attr-defined]
    return arguments


def register(name: str, options: dict[str, Any]) -> None:
    """Makes `name` (a `@task` function's module path) a Celery task of every app, run with
    `options` (`OPTION_ATTRIBUTES`); a later call replaces them."""
    known = name in _options
    _options[name] = dict(options)
    if not known:
        shared_task(name=name, base=DjangoTaskRunner, bind=True)(_run)


def registered() -> dict[str, dict[str, Any]]:
    """The module paths registered in this process, with their options."""
    return {name: dict(options) for name, options in _options.items()}


def _option(option: str, attribute: str) -> property:
    default = getattr(DjangoTaskRunner, attribute, None)

    def read(self: DjangoTaskRunner) -> Any:
        return _options.get(self.name, {}).get(option, default)

    def write(self: DjangoTaskRunner, value: Any) -> None:  # `celery control time_limit` sets them
        _options.setdefault(self.name, {})[option] = value

    read.__name__ = attribute
    return property(read, write, doc=f"The task's `{option}` option (else the project's default).")


# Read when needed, so an option set after the task was registered (the backend's settings
# changed, a decorator applied last) still counts; except the time limits, which a worker reads
# when its consumer starts (after it imported the tasks modules, decorators and settings included).
for _option_name, _attribute in OPTION_ATTRIBUTES.items():
    setattr(DjangoTaskRunner, _attribute, _option(_option_name, _attribute))

"""Django's Tasks API on Celery: `TASKS = {"default": {"BACKEND": "jobs.backends.CeleryBackend"}}`.

`@task` functions run on the Celery workers as `JobTask`s (`jobs.runtime.django_tasks`): the retry
policy with backoff, transient and permanent errors, dead letters that `requeue_dead` replays,
crash-loop quarantine, request ids, JSON logs and metrics. `enqueue` writes the job to the ledger
in the caller's transaction and publishes it once that commits (nothing lost while the broker is
down); `get_result` reads the task history, the ledger and the dead letters.

Options (the backend's `OPTIONS`):
- `TASKS`: per task, by module path: `{"shop.tasks.send_receipt": {"max_retries": 2}}`; the same
  keys as `task_options` (exception classes as dotted paths). They win over the code's own.
- `QUEUE_BY_PRIORITY`: for a task whose `queue_name` is Django's "default": the first
  `(minimum priority, queue)` its priority reaches; by default `high` from 1, `normal` from 0,
  `low` below (a queue the project does not declare falls back to Celery's default queue).
- `ETA_LIMIT`: a `run_after` further ahead than this many seconds (600, and never past
  `JOBS_HOLD_IN_BROKER_MAX` nor what the Redis visibility timeout allows) waits in the job table,
  not in the broker, and is published `JOBS_HOLD_IN_BROKER_MAX` seconds before it is due, with
  its `run_after` as ETA.
"""

from __future__ import annotations

import inspect
import json
from collections import abc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from inspect import isclass
from types import UnionType
from typing import Any, Literal, Optional, TypeVar, Union, cast, get_args, get_origin, get_type_hints, is_typeddict

from django.core import checks
from django.db import transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from jobs.conf import jobs_settings
from jobs.context import get_request_id
from jobs.limits import Limit, LimitError, UniqueJob
from jobs.runtime import django_tasks as runner
from jobs.tasks_compat import (
    DEFAULT_TASK_QUEUE_NAME,
    BaseTaskBackend,
    InvalidTask,
    Task,
    TaskError,
    TaskResult,
    TaskResultDoesNotExist,
    TaskResultStatus,
    normalize_json,
    task_enqueued,
    task_module_path,
)

F = TypeVar("F")

DEFAULT_QUEUE_BY_PRIORITY: tuple[tuple[int, str], ...] = ((1, "high"), (0, "normal"), (-100, "low"))
DEFAULT_ETA_LIMIT = 600.0


def ledger_lead() -> timedelta:
    """A job waiting in the table is published this long before its `run_after`, with it as ETA:
    a worker holds it no longer than it holds a short retry."""
    return timedelta(seconds=float(jobs_settings.HOLD_IN_BROKER_MAX))


#: Celery states and the Django status each one is.
STATUS_BY_STATE = {
    "PENDING": TaskResultStatus.READY,
    "RECEIVED": TaskResultStatus.READY,
    "RETRY": TaskResultStatus.READY,
    "STARTED": TaskResultStatus.RUNNING,
    "SUCCESS": TaskResultStatus.SUCCESSFUL,
    "FAILURE": TaskResultStatus.FAILED,
    "REVOKED": TaskResultStatus.FAILED,
}
FINISHED = {TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED}

#: The options a task may set, with the check each value must pass.
OPTION_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "max_retries": ("a whole number >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "backoff_base": ("a number of seconds > 0", lambda v: _is_number(v) and v > 0),
    "backoff_max": ("a number of seconds > 0", lambda v: _is_number(v) and v > 0),
    "transient_errors": ("a tuple of exception classes", lambda v: _are_exceptions(v)),
    "permanent_errors": ("a tuple of exception classes", lambda v: _are_exceptions(v)),
    "time_limit": ("a number of seconds > 0", lambda v: _is_number(v) and v > 0),
    "soft_time_limit": ("a number of seconds > 0", lambda v: _is_number(v) and v > 0),
    "alert_on_dead_letter": ("True or False", lambda v: isinstance(v, bool)),
    "limits": ("a list of jobs.limits.Limit, each name once", lambda v: _are_limits(v)),
    "unique": ("a jobs.limits.UniqueJob", lambda v: isinstance(v, UniqueJob)),
}
#: The attribute of a function that `task_options` sets.
OPTIONS_ATTRIBUTE = "__jobs_task_options__"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _are_limits(value: Any) -> bool:
    if not isinstance(value, tuple | list) or not all(isinstance(limit, Limit) for limit in value):
        return False
    return len({limit.name for limit in value}) == len(value)


def _are_exceptions(value: Any) -> bool:
    return isinstance(value, tuple | list) and all(isclass(c) and issubclass(c, BaseException) for c in value)


#: Types a task argument may be annotated with (and containers of them).
JSON_TYPES: frozenset[Any] = frozenset({int, float, str, bool, type(None), list, dict, tuple, Any, object})
JSON_CONTAINERS: frozenset[Any] = frozenset(
    {list, dict, tuple, Union, UnionType, Literal, abc.Sequence, abc.Mapping, abc.Iterable, Optional}
)


def json_type(annotation: Any) -> bool:
    """Whether values of `annotation` are what JSON carries (a str, number, bool, None, list,
    dict, or a TypedDict, a Literal, a union or container of those)."""
    if annotation in JSON_TYPES or is_typeddict(annotation):
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return True
    if origin in JSON_CONTAINERS:
        return all(json_type(arg) for arg in get_args(annotation) if arg is not Ellipsis)
    return False


def task_options(**options: Any) -> Callable[[F], F]:
    """Per-task options of a `@task` function, on every Django version::

        @task
        @task_options(max_retries=2, permanent_errors=(OutOfStock,))
        def send_receipt(order_id: int) -> None: ...

    Keys: `max_retries`, `backoff_base`, `backoff_max` (seconds), `transient_errors`,
    `permanent_errors` (exception classes), `time_limit`, `soft_time_limit` (seconds),
    `alert_on_dead_letter`; `limits` (`jobs.limits.Limit`s: at most N running or starting per
    key) and `unique` (a `jobs.limits.UniqueJob`: one unfinished job per key), their keys from
    the function's arguments. On Django 6.1 and the backport `@task(max_retries=2)` does the
    same (not `limits` and `unique`)."""
    clean = validate_options(options, where="task_options()")

    def decorate(target: F) -> F:
        func = target.func if isinstance(target, Task) else target
        setattr(func, OPTIONS_ATTRIBUTE, {**getattr(func, OPTIONS_ATTRIBUTE, {}), **clean})
        if isinstance(target, Task):  # applied above @task: the task is registered already
            backend = target.get_backend()
            if isinstance(backend, CeleryBackend):
                backend.register(target)
        return target

    return decorate


def validate_options(options: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """The options as the runner takes them (dotted exception paths imported); raises
    `InvalidTask` naming the first bad one."""
    clean: dict[str, Any] = {}
    for key, value in options.items():
        if key not in OPTION_CHECKS:
            known = ", ".join(OPTION_CHECKS)
            raise InvalidTask(f"{where}: unknown option {key!r} (known: {known})")
        if key.endswith("_errors") and isinstance(value, tuple | list):
            try:
                value = tuple(import_string(v) if isinstance(v, str) else v for v in value)
            except ImportError as exc:
                raise InvalidTask(f"{where}: {key}: {exc}") from exc
        what, ok = OPTION_CHECKS[key]
        if not ok(value):
            raise InvalidTask(f"{where}: {key} must be {what}, not {value!r}")
        clean[key] = tuple(value) if key.endswith("_errors") else value
    return clean


@dataclass(frozen=True, slots=True, kw_only=True)
class CeleryTask(Task):  # type: ignore[type-arg,misc] # generic and "not frozen" in the stubs only
    """The backend's `Task`: Django's, with the options `task_options` takes as fields, so that
    `@task(max_retries=2)` works where Django passes `@task` keywords on (6.1, the backport).
    Unset (None), an option is the code's other setting or the project's default."""

    max_retries: int | None = None
    backoff_base: float | None = None
    backoff_max: float | None = None
    transient_errors: tuple[type[BaseException], ...] | None = None
    permanent_errors: tuple[type[BaseException], ...] | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    alert_on_dead_letter: bool | None = None


class CeleryBackend(BaseTaskBackend):
    """Runs `@task` functions on the Celery workers, with everything `JobTask` gives a job."""

    task_class = CeleryTask
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        if "QUEUES" not in params:
            # Django's "default" (a queue chosen by priority) and every queue the project declares.
            from jobs.selectors import queue_names

            self.queues = {DEFAULT_TASK_QUEUE_NAME, *queue_names()}
        self.queue_by_priority = tuple(
            sorted(
                (
                    (int(minimum), str(queue))
                    for minimum, queue in self.options.get("QUEUE_BY_PRIORITY", DEFAULT_QUEUE_BY_PRIORITY)
                ),
                reverse=True,  # the highest minimum first, in whatever order they were written
            )
        )
        self.eta_limit = float(self.options.get("ETA_LIMIT", DEFAULT_ETA_LIMIT))

    # --- tasks ------------------------------------------------------------------------------

    def validate_task(self, task: Task[..., Any]) -> None:
        super().validate_task(task)
        self.register(task)

    def register(self, task: Task[..., Any]) -> None:
        """Makes the task's function a Celery task with its options (the code's, then the
        settings')."""
        path = task_module_path(task)
        own = dict(getattr(task.func, OPTIONS_ATTRIBUTE, {}))
        own.update({key: getattr(task, key) for key in OPTION_CHECKS if getattr(task, key, None) is not None})
        settings = (self.options.get("TASKS") or {}).get(path) or {}
        options = {
            **validate_options(own, where=path),
            **validate_options(settings, where=f'TASKS["{self.alias}"]["OPTIONS"]["TASKS"]["{path}"]'),
        }
        runner.register(path, options)

    def queue_for(self, task: Task[..., Any]) -> str:
        """The Celery queue of a task: its own `queue_name`, else the one its priority picks."""
        if task.queue_name != DEFAULT_TASK_QUEUE_NAME:
            return str(task.queue_name)
        from jobs.selectors import queue_names

        declared = set(queue_names())
        for minimum, queue in self.queue_by_priority:
            if task.priority >= minimum:
                return queue if queue in declared else jobs_settings.default_queue
        return jobs_settings.default_queue

    def eta_ceiling(self, task: Task[..., Any]) -> float:
        """How far ahead a job may wait in the broker: `ETA_LIMIT` and `JOBS_HOLD_IN_BROKER_MAX`
        (no worker holds long waits), and on Redis less than the visibility timeout (a message
        held longer is delivered to a second worker)."""
        limit = min(self.eta_limit, float(jobs_settings.HOLD_IN_BROKER_MAX))
        if jobs_settings.broker_is_redis:
            time_limit = runner.registered().get(task_module_path(task), {}).get("time_limit")
            margin = max(jobs_settings.visibility_timeout * 0.1, 60.0)
            visibility = jobs_settings.visibility_timeout - (time_limit or jobs_settings.task_time_limit) - margin
            limit = min(limit, max(visibility, 0.0))
        return limit

    # --- enqueue ----------------------------------------------------------------------------

    def _unique(self, task: Task[..., Any], path: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The unique enqueue a task's `unique` option asks for (its key from the arguments)."""
        from types import SimpleNamespace

        from jobs.runtime.outbox import unique_options

        declared = runner.registered().get(path, {}).get("unique")
        if declared is None:
            return None
        try:
            key = declared.key_for(SimpleNamespace(name=path, run=runner.arguments_signature(task)), args, kwargs)
        except LimitError as exc:
            raise InvalidTask(str(exc)) from None
        return unique_options(key, declared.unique_for, declared.unique_while, declared.unique_policy)

    def enqueue(self, task: Task[..., Any], args: Any, kwargs: Any) -> TaskResult[Any, Any]:
        from jobs.runtime.outbox import ledger_add

        self.validate_task(task)
        args = cast(list[Any], normalize_json(list(args)))
        kwargs = cast(dict[str, Any], normalize_json(dict(kwargs)))
        # What the broker and the ledger take: an error here, not later (NaN: PostgreSQL refuses it).
        json.dumps([args, kwargs], allow_nan=False)
        now = timezone.now()
        headers: dict[str, Any] = {
            runner.ENQUEUED_HEADER: now.isoformat(),
            runner.BACKEND_HEADER: self.alias,
            runner.PRIORITY_HEADER: task.priority,
            runner.QUEUE_NAME_HEADER: task.queue_name,
        }
        request_id = get_request_id()
        if request_id:
            headers["request_id"] = request_id
        options: dict[str, Any] = {"queue": self.queue_for(task)}
        not_before = None
        if task.run_after is not None:
            headers[runner.RUN_AFTER_HEADER] = task.run_after.isoformat()
            ahead = (task.run_after - now).total_seconds()
            if ahead > 0:
                options["eta"] = task.run_after.isoformat()
                if ahead > self.eta_ceiling(task):
                    not_before = task.run_after - ledger_lead()
        path = task_module_path(task)
        unique = self._unique(task, path, args, kwargs)
        task_id = ledger_add(
            path, args=args, kwargs=kwargs, headers=headers, not_before=not_before, unique=unique, **options
        )
        result: TaskResult[Any, Any] = TaskResult(
            task=task,
            id=task_id,
            status=TaskResultStatus.READY,
            enqueued_at=now,
            started_at=None,
            last_attempted_at=None,
            finished_at=None,
            args=args,
            kwargs=kwargs,
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        # Enqueued once the caller's transaction commits (at once outside one).
        transaction.on_commit(lambda: task_enqueued.send(type(self), task_result=result), robust=True)
        return result

    # --- results ----------------------------------------------------------------------------

    def get_result(self, result_id: str) -> TaskResult[Any, Any]:
        from django.db.models import Q
        from django_celery_results.models import TaskResult as HistoryRow

        from jobs.models import DeadLetter, DeadLetterEvent, OutboxMessage

        result_id = str(result_id)

        def history() -> tuple[Any, dict[str, Any], bool]:
            row = HistoryRow.objects.filter(task_id=result_id).first()
            record = self._record(row)
            status = STATUS_BY_STATE.get(row.status, TaskResultStatus.READY) if row is not None else None
            return row, record, status in FINISHED and bool(record)

        row, record, ended = history()
        ledger = None
        dead = None
        if not ended:
            ledger = OutboxMessage.objects.filter(task_id=result_id).first()
            if ledger is None:
                # A job's end is committed with its ledger row's delete: if the job ended between
                # the two reads above, its end is there now.
                row, record, ended = history()
        if ledger is None and not ended:
            # A dead letter keeps the id of the latest run that failed; its trail, every one's.
            failed_here = DeadLetterEvent.objects.filter(task_id=result_id, action=DeadLetterEvent.Action.FAILED)
            dead = (
                DeadLetter.objects.filter(Q(task_id=result_id) | Q(pk__in=failed_here.values("dead_letter_id")))
                .order_by("-pk")
                .first()
            )
        if row is None and ledger is None and dead is None:
            raise TaskResultDoesNotExist(result_id)
        return self._result(result_id, row, record, ledger, dead)

    @staticmethod
    def _record(row: Any) -> dict[str, Any]:
        """The job's own record in a task history row (empty when another writer stored it: the
        worker's main process after a hard time limit or a revoke)."""
        if row is None or not row.meta:
            return {}
        try:
            return dict((runner.history_decode(row, row.meta) or {}).get(runner.META_KEY) or {})
        except Exception:  # noqa: BLE001 - unreadable: read the row without it
            return {}

    def _result(self, result_id: str, row: Any, record: dict[str, Any], ledger: Any, dead: Any) -> TaskResult[Any, Any]:
        headers = ((ledger.options or {}).get("headers") or {}) if ledger is not None else {}
        path = record.get("task") or (ledger.task_name if ledger else None) or (dead.task_name if dead else None)
        path = path or (row.task_name if row is not None else None)
        task = self._task(path, record or headers, result_id)

        attempts = list(record.get("attempts") or headers.get(runner.ATTEMPTS_HEADER) or [])
        errors = [TaskError(**entry["error"]) for entry in attempts if entry.get("error")]
        status = TaskResultStatus.READY
        finished_at = None
        value = None
        if row is not None:
            status = STATUS_BY_STATE.get(row.status, TaskResultStatus.READY)
            if status in FINISHED:
                finished_at = row.date_done
            if status == TaskResultStatus.SUCCESSFUL:
                value = runner.history_decode(row, row.result)
            elif row.status in {"FAILURE", "RETRY", "REVOKED"} and not (attempts and attempts[-1].get("error")):
                errors.append(self._dead_letter_error(dead) if dead is not None else self._row_error(row))
            if not attempts and row.date_started is not None:
                attempts = [{"worker": row.worker or "", "started_at": row.date_started.isoformat()}]
        if dead is not None and status not in FINISHED:
            # Given up where no final state was stored (a message the worker could not run, a
            # result lost with its process): the dead letter says how it ended, whatever became
            # of the dead letter since (a replay runs under an id of its own).
            status = TaskResultStatus.FAILED
            finished_at = dead.failed_at
            if not (attempts and attempts[-1].get("error")):
                errors.append(self._dead_letter_error(dead))
            if not attempts and dead.worker:
                attempts = [{"worker": dead.worker}]
        started = [runner.parse_time(entry.get("started_at")) for entry in attempts]
        enqueued_at = runner.parse_time(record.get("enqueued_at") or headers.get(runner.ENQUEUED_HEADER))
        if enqueued_at is None:
            enqueued_at = ledger.created_at if ledger is not None else (row.date_created if row is not None else None)
        args = record.get("args") if record else None
        kwargs = record.get("kwargs") if record else None
        if args is None:  # the ledger's, else the dead letter's (secrets redacted there)
            source = ledger if ledger is not None else dead
            args = list(source.args) if source is not None else []
            kwargs = dict(source.kwargs) if source is not None else {}
        result: TaskResult[Any, Any] = TaskResult(
            task=task,
            id=result_id,
            status=status,
            enqueued_at=enqueued_at,
            started_at=started[0] if started else None,
            last_attempted_at=started[-1] if started else None,
            finished_at=finished_at,
            args=args,
            kwargs=kwargs or {},
            backend=record.get("backend") or headers.get(runner.BACKEND_HEADER) or self.alias,
            errors=errors,
            worker_ids=[entry.get("worker") or "" for entry in attempts],
        )
        if status == TaskResultStatus.SUCCESSFUL:
            object.__setattr__(result, "_return_value", value)
        return result

    def _task(self, path: str | None, record: Mapping[str, Any], result_id: str) -> Task[..., Any]:
        """The `Task` a result belongs to, as it was enqueued (priority, queue, run_after)."""
        try:
            found = import_string(path or "")
        except ImportError as exc:
            raise TaskResultDoesNotExist(f"{result_id}: its task {path!r} cannot be imported ({exc})") from exc
        if not isinstance(found, Task):
            raise TaskResultDoesNotExist(f"{result_id}: {path!r} is not a @task function")
        changes: dict[str, Any] = {}
        priority = record.get("priority", record.get(runner.PRIORITY_HEADER))
        queue_name = record.get("queue_name", record.get(runner.QUEUE_NAME_HEADER))
        run_after = runner.parse_time(record.get("run_after", record.get(runner.RUN_AFTER_HEADER)))
        if priority is not None and priority != found.priority:
            changes["priority"] = priority
        if queue_name and queue_name != found.queue_name:
            changes["queue_name"] = queue_name
        if run_after is not None:
            changes["run_after"] = run_after
        if not changes:
            return found
        try:
            return found.using(**changes)
        except InvalidTask:  # enqueued with a queue the settings no longer have: the task as it is now
            return found

    @staticmethod
    def _dead_letter_error(dead: Any) -> TaskError:
        """A dead letter's error (it keeps the exception's class name; its traceback ends with
        the dotted path, as Python prints it)."""
        path = dead.exception_type or "Exception"
        lines = [line for line in (dead.traceback or "").splitlines() if line.strip()]
        if lines:
            printed = lines[-1].split(":", 1)[0].strip()
            if printed.rsplit(".", 1)[-1] == path and printed.replace(".", "").replace("_", "").isalnum():
                path = printed
        if "." not in path:
            path = f"builtins.{path}"
        return TaskError(exception_class_path=path, traceback=dead.traceback or "")

    @staticmethod
    def _row_error(row: Any) -> TaskError:
        """The error of a failed state stored without the attempt's own record (a hard time
        limit, a lost worker: written by the worker's main process)."""
        try:
            stored = json.loads(row.result or "{}") or {}
        except (TypeError, ValueError):
            stored = {}
        name = stored.get("exc_type") or "Exception"
        module = stored.get("exc_module") or "builtins"
        return TaskError(exception_class_path=f"{module}.{name}", traceback=row.traceback or "")

    # --- checks -----------------------------------------------------------------------------

    def check(self, **kwargs: Any) -> Iterable[checks.CheckMessage]:  # type: ignore[override] # a generator, as Django's own
        from django.apps import apps

        if not apps.is_installed("django_celery_results"):
            yield checks.Error(
                f"TASKS[{self.alias!r}] runs on Celery and reads results from django-celery-results, "
                "which is not installed",
                hint='Add "django_celery_results" to INSTALLED_APPS and run migrate.',
                id="jobs.E010",
            )
        from jobs.selectors import queue_names

        declared = set(queue_names())
        unknown = sorted(q for q in self.queues if q != DEFAULT_TASK_QUEUE_NAME and q not in declared)
        if unknown:
            yield checks.Error(
                f"TASKS[{self.alias!r}]['QUEUES'] names queues Celery does not declare: {', '.join(unknown)}",
                hint="Name queues of CELERY_TASK_QUEUES (no worker consumes any other).",
                id="jobs.E011",
            )
        for _minimum, queue in self.queue_by_priority:
            if queue not in declared and "QUEUE_BY_PRIORITY" in self.options:
                yield checks.Warning(
                    f"TASKS[{self.alias!r}]: QUEUE_BY_PRIORITY names {queue!r}, which Celery does not "
                    f"declare; such tasks go to {jobs_settings.default_queue!r}",
                    id="jobs.W012",
                )
        yield from self._check_task_modules()
        yield from self._check_task_arguments()

    def _check_task_arguments(self) -> Iterable[checks.CheckMessage]:
        """A parameter annotated with a type JSON cannot carry (a datetime, a model instance)
        would fail at enqueue: said now."""
        for path in runner.registered():
            try:
                found = import_string(path)
                hints = get_type_hints(found.func)
            except Exception:  # noqa: BLE001,S112 - unresolvable annotations: nothing to say
                continue
            names = list(inspect.signature(found.func).parameters)
            if getattr(found, "takes_context", False):
                names = names[1:]
            for name in names:
                if name in hints and not json_type(hints[name]):
                    yield checks.Warning(
                        f"@task function {path}: argument {name!r} is annotated {hints[name]!r}, which JSON "
                        "cannot carry (a task's arguments travel as JSON)",
                        hint="Pass what JSON has (a str, number, list, dict): an ISO 8601 string, a primary key.",
                        obj=path,
                        id="jobs.W013",
                    )

    def _check_task_modules(self) -> Iterable[checks.CheckMessage]:
        """Each `@task` function this process knows must live where the worker imports it."""
        from celery import current_app

        imported = set(current_app.conf.imports or ()) | set(current_app.conf.include or ())
        from django.apps import apps

        discovered = {f"{config.name}.tasks" for config in apps.get_app_configs()}
        for path in runner.registered():
            module = path.rsplit(".", 1)[0]
            if any(module == m or module.startswith(m + ".") for m in discovered | imported):
                continue
            yield checks.Error(
                f"@task function {path} lives in {module}, which a Celery worker does not import",
                hint=(
                    "The worker imports each installed app's tasks module (autodiscover_tasks) and "
                    "CELERY_IMPORTS: move the function to <app>/tasks.py or add "
                    f'"{module}" to CELERY_IMPORTS.'
                ),
                obj=path,
                id="jobs.E012",
            )

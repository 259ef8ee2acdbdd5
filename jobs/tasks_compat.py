"""Django's Tasks API from wherever this Django has it: `django.tasks` (Django 6.0 and later) or
the `django-tasks` backport (`django_tasks`, for Django 5.2). The rest of `jobs` imports it from
here, so no other module needs to know which one it got.

The two agree on everything `jobs` uses but two exception names (`InvalidTask` is
`InvalidTaskError` in the backport); both are exported under Django's names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import django

if TYPE_CHECKING or django.VERSION >= (6, 0):  # the type checker reads Django's own
    from django.tasks import DEFAULT_TASK_QUEUE_NAME, task, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import (
        DEFAULT_TASK_PRIORITY,
        TASK_MAX_PRIORITY,
        TASK_MIN_PRIORITY,
        Task,
        TaskContext,
        TaskError,
        TaskResult,
        TaskResultStatus,
    )
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist, TaskResultMismatch
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json

    SOURCE = "django.tasks"
else:  # pragma: no cover - the Django 5.2 leg (make test-lts) runs this
    try:
        from django_tasks import DEFAULT_TASK_QUEUE_NAME, task, task_backends
        from django_tasks.backends.base import BaseTaskBackend
        from django_tasks.base import (
            DEFAULT_TASK_PRIORITY,
            TASK_MAX_PRIORITY,
            TASK_MIN_PRIORITY,
            Task,
            TaskContext,
            TaskError,
            TaskResult,
            TaskResultStatus,
        )
        from django_tasks.exceptions import InvalidTaskError as InvalidTask
        from django_tasks.exceptions import (
            TaskResultDoesNotExist,
            TaskResultMismatch,
        )
        from django_tasks.signals import task_enqueued, task_finished, task_started
        from django_tasks.utils import normalize_json
    except ImportError as exc:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(
            f"Django {django.get_version()} has no django.tasks: install the backport "
            "(pip install 'django-jobs-celery[backport]', which brings django-tasks) and add "
            '"django_tasks" to INSTALLED_APPS'
        ) from exc

    SOURCE = "django_tasks"

#: Task fields every version has (a `Task` subclass adds its own after them).
TASK_FIELDS = ("priority", "func", "backend", "queue_name", "run_after", "takes_context")


def task_module_path(task: Any) -> str:
    """`module.qualname` of a task's function: its name on the Celery side too."""
    return f"{task.func.__module__}.{task.func.__qualname__}"


__all__ = [
    "DEFAULT_TASK_PRIORITY",
    "DEFAULT_TASK_QUEUE_NAME",
    "SOURCE",
    "TASK_MAX_PRIORITY",
    "TASK_MIN_PRIORITY",
    "BaseTaskBackend",
    "InvalidTask",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskResult",
    "TaskResultDoesNotExist",
    "TaskResultMismatch",
    "TaskResultStatus",
    "normalize_json",
    "task",
    "task_backends",
    "task_enqueued",
    "task_finished",
    "task_started",
]

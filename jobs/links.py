"""Which row of an app a job is about, so the admin can link a dead letter to it and back.

An app registers each task whose argument names one of its rows, in its `AppConfig.ready()`::

    register_job_object("mailer.send_email", "mailer.Email", keyword="email_id")

The dead letter's page then links "Email #3", and the email's page lists its dead letters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.db.models import Model, Q

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from jobs.models import DeadLetter


@dataclass(frozen=True)
class JobObject:
    """Task `task_name` is about the row of `model` (an "app_label.Model" label) whose primary key
    is its argument at `position`, or passed by `keyword`."""

    task_name: str
    model: str
    position: int = 0
    keyword: str = ""

    def model_class(self) -> type[Model]:
        return apps.get_model(self.model)


_registry: dict[str, JobObject] = {}


def register_job_object(task_name: str, model: str, *, position: int = 0, keyword: str = "") -> None:
    """Says which row a task is about (see the module's docstring); registering again replaces."""
    _registry[task_name] = JobObject(task_name, model, position, keyword)


def job_object(dead_letter: DeadLetter) -> tuple[type[Model], Any] | None:
    """The model and primary key the dead letter's job was about, if its task registered one and
    the argument is there (redacted or missing: None)."""
    link = _registry.get(dead_letter.task_name)
    if link is None:
        return None
    args = dead_letter.args if isinstance(dead_letter.args, list) else []
    kwargs = dead_letter.kwargs if isinstance(dead_letter.kwargs, dict) else {}
    if len(args) > link.position:
        value = args[link.position]
    elif link.keyword and link.keyword in kwargs:
        value = kwargs[link.keyword]
    else:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    return link.model_class(), value


def dead_letters_of(obj: Model) -> QuerySet[DeadLetter]:
    """The dead letters of every registered task about `obj`, newest first."""
    from jobs.models import DeadLetter

    label = obj._meta.label
    matches = Q(pk__in=[])
    for link in _registry.values():
        if link.model != label:
            continue
        about = Q(**{f"args__{link.position}": obj.pk})
        if link.keyword:
            about |= Q(**{f"kwargs__{link.keyword}": obj.pk})
        matches |= Q(task_name=link.task_name) & about
    return DeadLetter.objects.filter(matches).order_by("-failed_at", "-pk")

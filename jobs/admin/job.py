"""The jobs page (`/admin/jobs/job/`): every job of the table by state, counts per state and
queue at the top, a job's page with its attempts, and the operator's actions (cancel, run now,
publish again), each confirmed first and written to the audit log (`JobAction`, listed read-only).

Looking takes `jobs.view_job`, acting `jobs.change_job`. Pages stay fast on a big table: counts
are exact up to a thousand and estimated beyond (`jobs.selectors.tally`), the list is ordered by
id, its pages counted up to `COUNT_CAP`, and no page runs a full `COUNT(*)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.timesince import timesince

from jobs.models import Job, JobAction, JobAttempt, OutboxMessage
from jobs.redaction import redact
from jobs.selectors import (
    COUNT_CAP,
    ROW_STATES,
    JobState,
    job_attempts,
    job_counts,
    job_dead_letter,
    job_max_attempts,
    job_queue,
    job_request_id,
    job_state,
    job_waits_for,
    job_worker,
    jobs_of_request,
    jobs_search,
    paused_queues,
    queue_names,
)
from jobs.services import JobsResult, jobs_cancel, jobs_publish_again, jobs_run_now

if TYPE_CHECKING:
    _JobAdmin = admin.ModelAdmin[Job]
    _JobActionAdmin = admin.ModelAdmin[JobAction]
else:
    _JobAdmin = _JobActionAdmin = admin.ModelAdmin

#: At most this many jobs per action (a filter of a million rows is done a batch at a time).
MAX_ACTION = 10_000


@dataclass(frozen=True)
class Action:
    """An operator's action on jobs: what the confirmation page says, what the report says, and
    the service that does it."""

    verb: str
    effect: str
    done: str
    service: Callable[..., JobsResult]


ACTIONS = {
    "cancel": Action(
        "Cancel",
        "never start (a running one is asked to stop); each is kept as a discarded dead letter",
        "Cancelled",
        jobs_cancel,
    ),
    "run_now": Action(
        "Run now", "start now instead of at their time (scheduled or retrying jobs only)", "Run now", jobs_run_now
    ),
}


def _span(start: Any, end: Any) -> str:
    """How long from `start` to `end`, as an operator reads it: "43 s", "5 minutes", "2 hours"."""
    seconds = (end - start).total_seconds()
    if abs(seconds) < 60:
        return f"{max(int(seconds), 0)} s"
    return timesince(start, end, depth=1)


def _actor(request: HttpRequest) -> str:
    return f"admin:{request.user.get_username()}"


class CappedPaginator(Paginator):  # type: ignore[type-arg]  # over a QuerySet, Django's admin paginates any
    """Counts up to `COUNT_CAP + 1` rows: the last pages of a bigger selection are not offered."""

    @cached_property
    def count(self) -> int:
        rows: Any = self.object_list  # the changelist's QuerySet, its annotations left out of the count
        return int(rows.order_by().values("pk")[: COUNT_CAP + 1].count())


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(str(state), str(state)) for state in ROW_STATES]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value in {str(state) for state in ROW_STATES}:
            return queryset.filter(state=ROW_STATES[JobState(value)])
        return queryset


class QueueFilter(admin.SimpleListFilter):
    title = "queue"
    parameter_name = "queue"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        paused = paused_queues()
        return [(name, f"{name} (paused)" if name in paused else name) for name in queue_names()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(queue=self.value()) if self.value() else queryset


class TaskFilter(admin.SimpleListFilter):
    """The project's registered tasks (no `DISTINCT` over the table)."""

    title = "task"
    parameter_name = "task"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        from celery import current_app

        names = sorted(name for name in current_app.tasks if not name.startswith("celery."))
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(task_name=self.value()) if self.value() else queryset


class RequestFilter(admin.SimpleListFilter):
    """`?request_id=`: the jobs one HTTP request (or one job) started; shown while it is set."""

    title = "request id"
    parameter_name = "request_id"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = request.GET.get(self.parameter_name)
        return [(value, value[:40])] if value else []

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return jobs_of_request(queryset, value) if value else queryset


class BrokerFilter(admin.SimpleListFilter):
    """Where the job's message is: not published yet (the backlog), or gone from the broker."""

    title = "message"
    parameter_name = "message"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("unpublished", "not published yet"), ("missing", "missing from the broker")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "unpublished":
            return queryset.filter(published_at__isnull=True, state=OutboxMessage.State.AVAILABLE)
        if self.value() == "missing":
            return queryset.filter(missing_since__isnull=False)
        return queryset


@admin.register(Job)
class JobAdmin(_JobAdmin):
    list_display = ("task_id", "task_name", "state_badge", "queue_name", "attempt", "when", "worker", "error")
    list_display_links = ("task_id",)
    list_filter = (StateFilter, QueueFilter, TaskFilter, RequestFilter, BrokerFilter)
    search_fields = ("task_id",)  # the search itself is get_search_results
    search_help_text = "A task id, or text in the arguments."
    ordering = ("-id",)
    paginator = CappedPaginator
    show_full_result_count = False
    list_per_page = 50
    actions = ("cancel_selected", "run_now_selected", "publish_again")
    change_list_template = "admin/jobs/job/change_list.html"
    change_form_template = "admin/jobs/job/change_form.html"
    fieldsets = (
        (
            None,
            {"fields": ("task_name", "task_id", "state_badge", "queue_name", "attempt", "when", "waits_for", "worker")},
        ),
        ("Arguments (secrets redacted)", {"fields": ("args_pretty", "kwargs_pretty")}),
        ("Attempts", {"fields": ("attempts_table", "dead_letter")}),
        (
            "Origin and delivery",
            {"fields": ("request", "created_at", "published_at", "runs", "crashes", "republished", "publish_error")},
        ),
    )
    readonly_fields = (
        "task_name",
        "task_id",
        "state_badge",
        "queue_name",
        "attempt",
        "when",
        "waits_for",
        "worker",
        "args_pretty",
        "kwargs_pretty",
        "attempts_table",
        "dead_letter",
        "request",
        "created_at",
        "published_at",
        "runs",
        "crashes",
        "republished",
        "publish_error",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        latest = JobAttempt.objects.filter(task_id=OuterRef("task_id")).order_by("-finished_at", "-pk")
        return super().get_queryset(request).annotate(latest_error=Subquery(latest.values("error")[:1]))

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Job], search_term: str
    ) -> tuple[QuerySet[Job], bool]:
        """A task id is found by its index; other text is looked for in the arguments (a scan of
        the table), never in those of a job carrying a secret (`jobs.selectors.jobs_search`)."""
        term = search_term.strip()
        return (jobs_search(queryset, term) if term else queryset), False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False  # cancel is the audited way; a row is the only record of a job in flight

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        # The list's actions take `jobs.change_job`; a job's page is never a form to edit.
        return obj is None and super().has_change_permission(request)

    # --- columns ----------------------------------------------------------------------------------

    @admin.display(description="state")
    def state_badge(self, obj: Job) -> str:
        state = job_state(obj)
        return format_html('<span class="job-state job-state-{}">{}</span>', state, state)

    @admin.display(description="queue")
    def queue_name(self, obj: Job) -> str:
        return job_queue(obj)

    @admin.display(description="attempt")
    def attempt(self, obj: Job) -> str:
        most = job_max_attempts(obj.task_name)
        return f"{obj.retries + 1} of {most}" if most else str(obj.retries + 1)

    @admin.display(description="when")
    def when(self, obj: Job) -> str:
        now = timezone.now()
        state = job_state(obj)
        if state in (JobState.SCHEDULED, JobState.RETRYING, JobState.THROTTLED) and obj.not_before:
            due = "due now" if obj.not_before <= now else f"due in {_span(now, obj.not_before)}"
            if state == JobState.THROTTLED:
                due = "over its limit, " + (
                    "rechecks now" if obj.not_before <= now else f"rechecks in {_span(now, obj.not_before)}"
                )
            return format_html('<span title="{}">{}</span>', f"{obj.not_before:%Y-%m-%d %H:%M:%S %Z}", due)
        if state == JobState.RUNNING:
            lease = f", lease until {obj.lease_until:%H:%M:%S}" if obj.lease_until else ""
            if obj.started_at:
                return f"running for {_span(obj.started_at, now)}{lease}"
            return f"running{lease}"
        since = obj.published_at or obj.created_at
        return f"queued for {_span(since, now)}"

    @admin.display(description="waits for")
    def waits_for(self, obj: Job) -> str:
        limits = job_waits_for(obj.task_id) if obj.state == Job.State.THROTTLED else []
        if not limits:
            return "-"
        return format_html_join(", ", "limit {} for key “{}”", limits)

    @admin.display(description="worker")
    def worker(self, obj: Job) -> str:
        return job_worker(obj) or "-"

    @admin.display(description="last error")
    def error(self, obj: Job) -> str:
        text = getattr(obj, "latest_error", None) or obj.last_error
        return (text[:100] + "…" if len(text) > 100 else text) if text else "-"

    @admin.display(description="last publish error")
    def publish_error(self, obj: Job) -> str:
        return obj.last_error or "-"

    @admin.display(description="positional")
    def args_pretty(self, obj: Job) -> str:
        safe, _ = redact(list(obj.args or ()))
        return format_html("<pre>{}</pre>", json.dumps(safe, indent=2, default=str))

    @admin.display(description="keyword")
    def kwargs_pretty(self, obj: Job) -> str:
        safe, _ = redact(dict(obj.kwargs or {}))
        return format_html("<pre>{}</pre>", json.dumps(safe, indent=2, default=str))

    @admin.display(description="earlier attempts")
    def attempts_table(self, obj: Job) -> str:
        attempts = job_attempts(obj.task_id)
        if not attempts:
            return "none: this is its first attempt"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    a.attempt + 1,
                    f"{a.started_at:%Y-%m-%d %H:%M:%S}" if a.started_at else "-",
                    f"{a.finished_at:%Y-%m-%d %H:%M:%S}",
                    a.worker or "-",
                    a.get_outcome_display(),
                    a.error[:300] or "-",
                )
                for a in attempts
            ),
        )
        return format_html(
            "<table><thead><tr><th>attempt</th><th>started</th><th>ended</th><th>worker</th><th>outcome</th>"
            "<th>error</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="dead letter")
    def dead_letter(self, obj: Job) -> str:
        letter = job_dead_letter(obj.task_id)
        if letter is None:
            return "-"
        url = reverse("admin:jobs_deadletter_change", args=[letter.pk])
        return format_html('<a href="{}">#{} {} ({})</a>', url, letter.pk, letter.exception_type, letter.status)

    @admin.display(description="request id")
    def request(self, obj: Job) -> str:
        request_id = job_request_id(obj)
        if not request_id:
            return "-"
        url = reverse("admin:jobs_job_changelist") + "?" + urlencode({"request_id": request_id})
        return format_html('{} <a href="{}">its other jobs</a>', request_id, url)

    # --- the list's top: counts per state and queue ----------------------------------------------

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        from jobs.selectors import job_counts_by_queue

        counts = job_counts()
        paused = paused_queues()
        by_queue = job_counts_by_queue(queue_names())
        context = {
            "state_counts": [(state, str(counts[str(state)])) for state in JobState],
            "queue_counts": [
                (name, [(state, str(value)) for state, value in states.items()], paused.get(name))
                for name, states in by_queue.items()
            ],
            "can_act": self.has_change_permission(request),
            "title": "Jobs",
            "is_nav_sidebar_enabled": False,  # the list needs the width
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    # --- actions ------------------------------------------------------------------------------------

    def _confirm_page(
        self, request: HttpRequest, kind: str, *, title: str, total: int, sample: list[Job], back: str, **extra: Any
    ) -> HttpResponse:
        """The page that asks before the action `kind` is done to `total` jobs (`sample` named);
        `extra`: the list action's form fields, sent back once confirmed."""
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "verb": ACTIONS[kind].verb,
            "effect": ACTIONS[kind].effect,
            "count": f"{total:,}" if total <= MAX_ACTION else f"the first {MAX_ACTION:,} of more than {MAX_ACTION:,}",
            "plural": total != 1,
            "sample": [(job.task_id, job.task_name, job_state(job)) for job in sample],
            "more": max(0, min(total, MAX_ACTION) - len(sample)),
            "back": back,
            **extra,
        }
        return TemplateResponse(request, "admin/jobs/job/confirm_action.html", context)

    def _act_on_selection(self, request: HttpRequest, queryset: QuerySet[Job], action: str) -> HttpResponse | None:
        """A list action: its confirmation page first (for the selection or the whole filter)."""
        if request.POST.get("confirm") != "yes":
            return self._confirm_page(
                request,
                action,
                title=f"{ACTIONS[action].verb} jobs?",
                total=queryset[: MAX_ACTION + 1].count(),
                sample=list(queryset.order_by("-pk")[:20]),
                back=request.get_full_path(),
                action=f"{action}_selected",
                selected=request.POST.getlist(ACTION_CHECKBOX_NAME),
                select_across=request.POST.get("select_across") == "1",
                action_checkbox_name=ACTION_CHECKBOX_NAME,
            )
        chosen = ACTIONS[action]
        self._report(request, chosen.done, chosen.service(task_ids=self._ids(queryset), actor=_actor(request)))
        return None

    def _report(self, request: HttpRequest, verb: str, result: JobsResult) -> None:
        done = len(result.done)
        self.message_user(request, f"{verb}: {done} job{'s' if done != 1 else ''}.", messages.SUCCESS)
        if result.stopping:
            count = len(result.stopping)
            self.message_user(request, f"Asked {count} running job{'s' if count != 1 else ''} to stop.")
        if result.refused:
            first = "; ".join(f"{task_id}: {why}" for task_id, why in result.refused[:3])
            more = f" (and {len(result.refused) - 3} more)" if len(result.refused) > 3 else ""
            self.message_user(request, f"Left {len(result.refused)}: {first}{more}.", messages.WARNING)
        if result.error:
            self.message_user(request, result.error, messages.ERROR)

    def _ids(self, queryset: QuerySet[Job]) -> list[str]:
        return list(queryset.order_by("pk").values_list("task_id", flat=True)[:MAX_ACTION])

    @admin.action(description="Cancel selected jobs", permissions=["change"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Job]) -> HttpResponse | None:
        return self._act_on_selection(request, queryset, "cancel")

    @admin.action(description="Run selected jobs now", permissions=["change"])
    def run_now_selected(self, request: HttpRequest, queryset: QuerySet[Job]) -> HttpResponse | None:
        return self._act_on_selection(request, queryset, "run_now")

    @admin.action(description="Publish selected again now (a message the broker lost)", permissions=["change"])
    def publish_again(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        published, error = jobs_publish_again(task_ids=self._ids(queryset), actor=_actor(request))
        noun = "job" if published == 1 else "jobs"
        self.message_user(request, f"Published {published} {noun} again (same task ids).", messages.SUCCESS)
        if error:
            self.message_user(request, f"Stopped: {error}. The rest go out with the relay.", messages.ERROR)

    # --- a job's page: its own buttons ------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<path:object_id>/act/<str:action>/",
                self.admin_site.admin_view(self.act_view),
                name="jobs_job_act",
            ),
            *super().get_urls(),
        ]

    def act_view(self, request: HttpRequest, object_id: str, action: str) -> HttpResponse:
        """Cancel or run now one job from its page: a confirmation page, then the action."""
        if action not in ACTIONS:
            raise Http404("no such action")
        if not self.has_change_permission(request):
            raise PermissionDenied
        job = self.get_object(request, object_id)
        if job is None:
            self.message_user(request, "That job is no longer in the table (it has finished).", messages.WARNING)
            return HttpResponseRedirect(reverse("admin:jobs_job_changelist"))
        chosen = ACTIONS[action]
        if request.method == "POST" and request.POST.get("confirm") == "yes":
            self._report(request, chosen.done, chosen.service(task_ids=[job.task_id], actor=_actor(request)))
            return HttpResponseRedirect(reverse("admin:jobs_job_changelist"))
        back = reverse("admin:jobs_job_change", args=[job.pk])
        return self._confirm_page(request, action, title=f"{chosen.verb} this job?", total=1, sample=[job], back=back)

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Job | None = None,
    ) -> HttpResponse:
        if obj is not None and self.has_change_permission(request):
            state = job_state(obj)
            context["job_actions"] = [
                (reverse("admin:jobs_job_act", args=[obj.pk, name]), ACTIONS[name].verb)
                for name in ACTIONS
                if name == "cancel" or state in (JobState.SCHEDULED, JobState.RETRYING)
            ]
        return super().render_change_form(request, context, add, change, form_url, obj)


@admin.register(JobAction)
class JobActionAdmin(_JobActionAdmin):
    """The operators' audit log: read-only."""

    list_display = ("at", "actor", "action", "target", "count", "short_note")
    list_filter = ("action",)
    search_fields = ("actor", "target")
    date_hierarchy = "at"
    readonly_fields = ("at", "actor", "action", "target", "count", "task_ids", "note")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: JobAction | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: JobAction | None = None) -> bool:
        return False

    @admin.display(description="note")
    def short_note(self, obj: JobAction) -> str:
        return obj.note[:100]

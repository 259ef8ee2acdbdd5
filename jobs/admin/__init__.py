"""The admin of `jobs`: dead letters (filter, search, read, requeue, discard, a grouped view), the
jobs page and its audit log (`jobs.admin.job`), API tokens, the dashboard, and django-celery-beat's
schedules with their actions behind the change permission."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.contrib.admin.exceptions import NotRegistered
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.utils import flatten_fieldsets
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django_celery_beat.admin import PeriodicTaskAdmin as BeatPeriodicTaskAdmin
from django_celery_beat.models import PeriodicTask

from jobs.links import dead_letters_of, job_object
from jobs.models import ApiToken, DailyReport, Dashboard, DeadLetter, DeadLetterEvent, DeadLetterPurge
from jobs.selectors import dead_letter_groups
from jobs.services import (
    RequeueResult,
    UnknownQueue,
    api_token_create,
    api_tokens_revoke,
    dead_letters_discard,
    dead_letters_requeue,
    queue_pause,
    queue_resume,
    schedules_enable,
    schedules_run_now,
)

if TYPE_CHECKING:
    # django-stubs makes the admin classes generic in their model, Django's own are not subscriptable
    # (django_stubs_ext.monkeypatch() would make them so, but it is a dev requirement only).
    _DeadLetterEventInline = admin.TabularInline[DeadLetterEvent, DeadLetter]
    _DeadLetterAdmin = admin.ModelAdmin[DeadLetter]
    _DeadLetterPurgeAdmin = admin.ModelAdmin[DeadLetterPurge]
    _DailyReportAdmin = admin.ModelAdmin[DailyReport]
    _ApiTokenAdmin = admin.ModelAdmin[ApiToken]
    _DashboardAdmin = admin.ModelAdmin[Dashboard]
else:
    _DeadLetterEventInline = admin.TabularInline
    _DeadLetterAdmin = _DeadLetterPurgeAdmin = _DailyReportAdmin = admin.ModelAdmin
    _ApiTokenAdmin = _DashboardAdmin = admin.ModelAdmin


def _plural(count: int, singular: str = "dead letter", plural: str = "dead letters") -> str:
    return f"{count} {singular if count == 1 else plural}"


def _actor(request: HttpRequest) -> str:
    return f"admin:{request.user.get_username()}"


def dead_letter_links(obj: Any, *, limit: int = 20) -> str:
    """HTML for an app's admin page: the dead letters of the jobs about `obj` (see
    `jobs.links`), each linked to its page, newest first; "-" when there are none."""
    rows = list(dead_letters_of(obj)[:limit])
    if not rows:
        return "-"
    return format_html(
        "<ul style='margin:0;padding-left:1.2em'>{}</ul>",
        format_html_join(
            "",
            '<li><a href="{}">Dead letter #{}</a>: {}, {} ({})</li>',
            (
                (
                    reverse("admin:jobs_deadletter_change", args=[row.pk]),
                    row.pk,
                    row.get_status_display().lower(),
                    row.exception_type or row.reason,
                    f"{row.failed_at:%Y-%m-%d %H:%M}",
                )
                for row in rows
            ),
        ),
    )


def _pending_of_cause(request: HttpRequest) -> QuerySet[DeadLetter]:
    """The pending dead letters of the cause (task and exception type) a form posted."""
    return DeadLetter.objects.filter(
        status=DeadLetter.Status.PENDING,
        task_name=request.POST.get("task_name", ""),
        exception_type=request.POST.get("exception_type", ""),
    )


def report_requeue(model_admin: Any, request: HttpRequest, result: RequeueResult) -> None:
    """The messages an admin page shows after a requeue: how many went, and what did not."""
    if result.count:
        model_admin.message_user(request, f"Requeued {_plural(result.count)}.", messages.SUCCESS)
    if result.skipped:
        model_admin.message_user(
            request,
            f"Skipped {_plural(len(result.skipped))} whose arguments were redacted when stored.",
            messages.WARNING,
        )
    if result.error:
        model_admin.message_user(
            request,
            f"Stopped: {result.error}. {_plural(len(result.waiting))} wait in the outbox and go out when the "
            "broker answers; the rest stay pending.",
            messages.ERROR,
        )
    if not (result.count or result.skipped or result.error):
        model_admin.message_user(request, "Nothing to requeue: no pending dead letter was selected.", messages.WARNING)


class DeadLetterEventInline(_DeadLetterEventInline):
    model = DeadLetterEvent
    extra = 0
    can_delete = False
    fields = ("at", "action", "actor", "task_id", "note")
    readonly_fields = fields
    ordering = ("-at", "-id")

    def has_add_permission(self, request: HttpRequest, obj: DeadLetter | None = None) -> bool:
        return False


@admin.register(DeadLetter)
class DeadLetterAdmin(_DeadLetterAdmin):
    list_display = (
        "id",
        "status",
        "task_name",
        "exception_type",
        "queue",
        "reason",
        "failure_count",
        "failed_at",
    )
    list_display_links = ("id", "task_name")
    list_filter = ("status", "reason", "queue", "task_name", "exception_type")
    date_hierarchy = "failed_at"
    search_fields = ("=task_id", "=request_id", "=requeued_task_id", "exception_message")
    show_full_result_count = False  # one COUNT less per page on large tables
    list_per_page = 100
    actions = ["requeue_selected", "discard_selected"]
    inlines = [DeadLetterEventInline]
    change_list_template = "admin/jobs/deadletter/change_list.html"
    fieldsets = (
        (None, {"fields": ("status", "task_name", "task_id", "queue", "reason", "request_id", "worker")}),
        ("Failure", {"fields": ("exception_type", "exception_message", "traceback_pretty", "retries")}),
        ("Arguments", {"fields": ("job_object", "args_pretty", "kwargs_pretty", "redaction", "raw_message")}),
        (
            "History",
            {
                "fields": (
                    "failure_count",
                    "first_failed_at",
                    "failed_at",
                    "requeue_count",
                    "requeued_at",
                    "requeued_by",
                    "requeued_task_id",
                    "discarded_at",
                    "discarded_by",
                )
            },
        ),
    )

    change_form_template = "admin/jobs/deadletter/change_form.html"

    def get_readonly_fields(self, request: HttpRequest, obj: DeadLetter | None = None) -> list[str]:
        return flatten_fieldsets(self.fieldsets)  # every field shown, in order

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: DeadLetter | None = None,
    ) -> HttpResponse:
        # A record the system wrote: nothing to save or delete here. What an operator does with
        # it (requeue, discard) are the buttons of change_form.html, through the list's actions.
        context.update(
            {
                "show_save": False,
                "show_save_and_continue": False,
                "show_save_and_add_another": False,
                "show_delete": False,
                "can_act": obj is not None
                and obj.status == DeadLetter.Status.PENDING
                and self.has_change_permission(request, obj),
                "permanent": obj is not None and obj.reason == DeadLetter.Reason.PERMANENT_ERROR,
                "action_checkbox_name": ACTION_CHECKBOX_NAME,
                "changelist_url": reverse("admin:jobs_deadletter_changelist"),
            }
        )
        return super().render_change_form(request, context, add, change, form_url, obj)

    @admin.display(description="The job's object")
    def job_object(self, obj: DeadLetter) -> str:
        found = job_object(obj)
        if found is None:
            return "-"
        model, pk = found
        meta = model._meta
        label = f"{str(meta.verbose_name).capitalize()} #{pk}"
        try:
            url = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[pk])
        except NoReverseMatch:
            return label
        try:
            exists = model._default_manager.filter(pk=model._meta.pk.to_python(pk)).exists()
        except (ValidationError, ValueError, TypeError, OverflowError):
            return label  # not an id this model can have (the job was refused for it)
        if not exists:
            return f"{label} (deleted)"
        return format_html('<a href="{}">{}</a>', url, label)

    @admin.display(description="Redaction")
    def redaction(self, obj: DeadLetter) -> str:
        if obj.redacted:
            return "Some arguments were secrets and are stored redacted: this job cannot be requeued as it was."
        return "None: the arguments are stored as the job had them."

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # only the system writes dead letters

    @admin.display(description="Traceback")
    def traceback_pretty(self, obj: DeadLetter) -> str:
        return format_html('<pre style="white-space: pre-wrap">{}</pre>', obj.traceback or "-")

    @admin.display(description="Args")
    def args_pretty(self, obj: DeadLetter) -> str:
        return format_html("<pre>{}</pre>", json.dumps(obj.args, indent=2, ensure_ascii=False))

    @admin.display(description="Kwargs")
    def kwargs_pretty(self, obj: DeadLetter) -> str:
        return format_html("<pre>{}</pre>", json.dumps(obj.kwargs, indent=2, ensure_ascii=False))

    # --- actions ------------------------------------------------------------------------------

    def _confirm(
        self, request: HttpRequest, queryset: QuerySet[DeadLetter], action: str, verb: str
    ) -> HttpResponse | None:
        """Renders a confirmation page unless the form was confirmed; None once confirmed."""
        if request.POST.get("confirm") == "yes":
            return None
        pending = queryset.filter(status=DeadLetter.Status.PENDING)
        is_pending = Q(status=DeadLetter.Status.PENDING)
        counts = queryset.aggregate(
            total=Count("pk"),
            pending=Count("pk", filter=is_pending),
            permanent=Count("pk", filter=is_pending & Q(reason=DeadLetter.Reason.PERMANENT_ERROR)),
        )
        context = {
            "permanent_count": counts["permanent"] if action.startswith("requeue") else 0,
            **self.admin_site.each_context(request),
            "title": f"{verb} dead letters?",
            "opts": self.model._meta,
            "action": action,
            "verb": verb,
            "selected": list(queryset.values_list("pk", flat=True)),
            "pending_count": counts["pending"],
            "other_count": counts["total"] - counts["pending"],
            "sample": pending.order_by("-failed_at")[:20],
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/jobs/deadletter/confirm_action.html", context)

    @admin.action(description="Requeue selected dead letters", permissions=["change"])
    def requeue_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> HttpResponse | None:
        page = self._confirm(request, queryset, "requeue_selected", "Requeue")
        if page is not None:
            return page
        result = dead_letters_requeue(dead_letters=queryset, actor=_actor(request))
        report_requeue(self, request, result)
        return None

    @admin.action(description="Discard selected dead letters", permissions=["change"])
    def discard_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> HttpResponse | None:
        page = self._confirm(request, queryset, "discard_selected", "Discard")
        if page is not None:
            return page
        count = dead_letters_discard(dead_letters=queryset, actor=_actor(request))
        self.message_user(request, f"Discarded {_plural(count)}.", messages.SUCCESS)
        return None

    # --- grouped view -------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        info = self.model._meta.app_label, self.model._meta.model_name
        return [
            path("groups/", self.admin_site.admin_view(self.groups_view), name="{}_{}_groups".format(*info)),
            *super().get_urls(),
        ]

    def groups_view(self, request: HttpRequest) -> HttpResponse:
        """Pending dead letters by task and exception type, each group requeued with one click."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        url = reverse("admin:jobs_deadletter_groups")
        if request.method == "POST":
            if not self.has_change_permission(request):
                return HttpResponse(status=403)
            rows = _pending_of_cause(request)
            report_requeue(self, request, dead_letters_requeue(dead_letters=rows, actor=_actor(request)))
            return HttpResponseRedirect(url)
        context = {
            **self.admin_site.each_context(request),
            "title": "Pending dead letters by task and exception",
            "opts": self.model._meta,
            "groups": dead_letter_groups(),
            "changelist_url": reverse("admin:jobs_deadletter_changelist"),
        }
        return render(request, "admin/jobs/deadletter/groups.html", context)


@admin.register(DeadLetterPurge)
class DeadLetterPurgeAdmin(_DeadLetterPurgeAdmin):
    """The record of purges: read-only, and kept (delete is refused too)."""

    list_display = ("at", "actor", "count", "statuses", "older_than")
    date_hierarchy = "at"
    search_fields = ("actor",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: DeadLetterPurge | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: DeadLetterPurge | None = None) -> bool:
        return False


@admin.register(DailyReport)
class DailyReportAdmin(_DailyReportAdmin):
    list_display = ("day", "created_at", "dead_letters_created", "tasks")
    date_hierarchy = "day"
    readonly_fields = ("day", "created_at", "report")
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: DailyReport | None = None) -> bool:
        return False

    @admin.display(description="Dead letters created")
    def dead_letters_created(self, obj: DailyReport) -> int:
        count: int = obj.data.get("dead_letters_created", 0)  # a JSONField: typed Any
        return count

    @admin.display(description="Tasks")
    def tasks(self, obj: DailyReport) -> int:
        return sum(obj.data.get("totals", {}).values())

    @admin.display(description="Report")
    def report(self, obj: DailyReport) -> str:
        return format_html("<pre>{}</pre>", obj.text)


@admin.register(ApiToken)
class ApiTokenAdmin(_ApiTokenAdmin):
    """Tokens for the staff API: an admin creates one for a staff user (it is shown once) and
    revokes it when it is no longer needed."""

    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "=prefix")
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke_selected"]

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> list[str]:
        if obj is not None:  # a token is made, used and revoked; never edited
            return list(self.fields)
        return list(self.readonly_fields)

    def _holders(self, request: HttpRequest) -> QuerySet[Any]:
        """Whom this admin may make a token for: any active staff member for a superuser, else only
        themselves (a token acts with its holder's permissions)."""
        from django.contrib.auth import get_user_model

        users = get_user_model()._default_manager.filter(is_staff=True, is_active=True)
        if request.user.is_superuser:
            return users
        return users.filter(pk=request.user.pk or 0)  # anonymous never reaches the admin

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "user":
            kwargs["queryset"] = self._holders(request)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        if change:
            return
        holder = obj.user.pk
        if holder is None or not self._holders(request).filter(pk=holder).exists():
            raise PermissionDenied("a token for another user needs a superuser")
        token, raw = api_token_create(user=obj.user, name=obj.name)
        obj.pk, obj.key_hash, obj.prefix, obj.created_at = token.pk, token.key_hash, token.prefix, token.created_at
        request._jobs_new_token = raw  # type: ignore[attr-defined] # shown by response_add, on this page only

    def response_add(self, request: HttpRequest, obj: ApiToken, post_url_continue: str | None = None) -> HttpResponse:
        """The token, once, on the page that answers the save (not in a message: Django's default
        message storage is a cookie, which would carry it back and forth)."""
        context = {
            **self.admin_site.each_context(request),
            "title": "API token created",
            "opts": self.model._meta,
            "token": obj,
            "raw": getattr(request, "_jobs_new_token", ""),
            "changelist_url": reverse("admin:jobs_apitoken_changelist"),
        }
        return TemplateResponse(request, "admin/jobs/apitoken/created.html", context)

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = api_tokens_revoke(tokens=queryset)
        self.message_user(request, f"Revoked {_plural(count, 'token', 'tokens')}.", messages.SUCCESS)


@admin.register(Dashboard)
class DashboardAdmin(_DashboardAdmin):
    """The operator's dashboard at /admin/jobs/dashboard/ (see `jobs.dashboard`): every staff
    member may look; acting on dead letters takes the permission to change them."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_module_permission(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        return [path("", self.admin_site.admin_view(self.dashboard_view), name="jobs_dashboard_changelist")]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        from jobs.dashboard import REFRESH_SECONDS, snapshot

        if not self.has_view_permission(request):
            raise PermissionDenied
        can_act = request.user.has_perm("jobs.change_deadletter")
        can_pause = request.user.has_perm("jobs.change_job")
        can_steer = request.user.has_perm("django_celery_beat.change_periodictask")
        if request.method == "POST":
            if request.POST.get("action") in {"pause_queue", "resume_queue"}:
                if not can_pause:
                    raise PermissionDenied
                self._pause(request)
                return HttpResponseRedirect(request.path)
            if request.POST.get("action") in {"pause_schedule", "resume_schedule", "run_schedule"}:
                if not can_steer:
                    raise PermissionDenied
                self._steer(request)
                return HttpResponseRedirect(request.path)
            if not can_act:
                raise PermissionDenied
            self._act(request)
            return HttpResponseRedirect(request.path)
        context = {
            **self.admin_site.each_context(request),
            "title": "Dashboard",
            "is_nav_sidebar_enabled": False,  # the page needs the width
            "opts": self.model._meta,
            "can_act": can_act,
            "can_pause": can_pause,
            "can_steer": can_steer,
            "refresh_seconds": REFRESH_SECONDS,
            **snapshot(request.user),
        }
        template = "admin/jobs/dashboard/sections.html" if request.GET.get("part") else "admin/jobs/dashboard.html"
        return TemplateResponse(request, template, context)

    def _pause(self, request: HttpRequest) -> None:
        """Pauses or resumes one queue, audited."""
        queue = request.POST.get("queue", "")
        pause = request.POST.get("action") == "pause_queue"
        try:
            changed = (queue_pause if pause else queue_resume)(queue=queue, actor=_actor(request))
        except UnknownQueue as exc:
            self.message_user(request, f"Nothing done: {exc}.", messages.ERROR)
            return
        what = "paused: no worker takes its jobs, which wait in it" if pause else "resumed"
        if changed:
            self.message_user(request, f"Queue {queue} {what}.", messages.SUCCESS)
        else:
            self.message_user(request, f"Queue {queue} was {'paused' if pause else 'not paused'} already.")

    def _steer(self, request: HttpRequest) -> None:
        """Pauses, resumes or runs now one schedule, audited."""
        pk = request.POST.get("schedule", "")
        rows = PeriodicTask.objects.filter(pk=int(pk)) if pk.isdigit() else PeriodicTask.objects.none()
        name = rows.values_list("name", flat=True).first()
        if name is None:
            self.message_user(request, "Nothing done: no such schedule.", messages.ERROR)
            return
        action = request.POST.get("action")
        if action == "run_schedule":
            try:
                schedules_run_now(schedules=rows, actor=_actor(request))
            except LookupError as exc:
                self.message_user(request, f"{exc}.", messages.ERROR)
                return
            self.message_user(request, f"Schedule {name} started now.", messages.SUCCESS)
            return
        enabled = action == "resume_schedule"
        schedules_enable(schedules=rows, enabled=enabled, actor=_actor(request))
        self.message_user(request, f"Schedule {name} {'resumed' if enabled else 'paused'}.", messages.SUCCESS)

    def _act(self, request: HttpRequest) -> None:
        """Requeue or discard the pending dead letters of one cause (task and exception type),
        audited as the list's actions are."""
        action = request.POST.get("action")
        rows = _pending_of_cause(request)
        if action == "requeue":
            report_requeue(self, request, dead_letters_requeue(dead_letters=rows, actor=_actor(request)))
        elif action == "discard":
            count = dead_letters_discard(dead_letters=rows, actor=_actor(request), note="from the dashboard")
            self.message_user(request, f"Discarded {_plural(count)}.", messages.SUCCESS)
        else:
            self.message_user(request, "Nothing done: unknown action.", messages.ERROR)


class PeriodicTaskAdmin(BeatPeriodicTaskAdmin):  # type: ignore[misc]  # django-celery-beat has no types
    """django-celery-beat's admin, whose actions (enable, disable, toggle, run now) declare no
    permission, so Django offers them to anyone who may see the list: a view-only staff member
    could run or stop schedules. Here they take the change permission."""

    CHANGING_ACTIONS = ("enable_tasks", "disable_tasks", "toggle_tasks", "run_tasks")
    change_form_template = "admin/jobs/periodictask/change_form.html"  # no "Translation: undefined"

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions: dict[str, Any] = super().get_actions(request)
        actions.pop("toggle_tasks", None)  # "pause" and "resume" say what they do; each is audited
        if not self.has_change_permission(request):
            for name in self.CHANGING_ACTIONS:
                actions.pop(name, None)
        return actions

    # Beat's own actions, audited (JobAction) and, for "run", through the job table.

    @admin.action(description="Resume selected schedules")
    def enable_tasks(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        names = schedules_enable(schedules=queryset, enabled=True, actor=_actor(request))
        self.message_user(request, f"Resumed {_plural(len(names), 'schedule', 'schedules')}.", messages.SUCCESS)

    @admin.action(description="Pause selected schedules")
    def disable_tasks(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        names = schedules_enable(schedules=queryset, enabled=False, actor=_actor(request))
        self.message_user(request, f"Paused {_plural(len(names), 'schedule', 'schedules')}.", messages.SUCCESS)

    @admin.action(description="Run selected schedules now")
    def run_tasks(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        try:
            started = schedules_run_now(schedules=queryset, actor=_actor(request))
        except LookupError as exc:
            self.message_user(request, f"{exc}.", messages.ERROR)
            return
        self.message_user(request, f"Started {_plural(len(started), 'schedule', 'schedules')} now.", messages.SUCCESS)


def _guard_schedule_actions() -> None:
    """Puts `PeriodicTaskAdmin` in place of django-celery-beat's own (registered when this module
    imported it, whatever the order of INSTALLED_APPS), but never over a host's own admin."""
    try:
        registered = admin.site.get_model_admin(PeriodicTask)
    except NotRegistered:
        registered = None
    if registered is not None and type(registered) is not BeatPeriodicTaskAdmin:
        return  # the host's: its actions are its own business
    if registered is not None:
        admin.site.unregister(PeriodicTask)
    admin.site.register(PeriodicTask, PeriodicTaskAdmin)


_guard_schedule_actions()


from jobs.admin import job as _job  # noqa: E402, F401 - registers the jobs page and its audit log

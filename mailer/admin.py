"""Admin for emails: list, filter, search, read the rendered message, resend."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from jobs.admin import dead_letter_links
from mailer.models import Email, EmailAttachment
from mailer.services import emails_resend


def _plural(count: int, singular: str = "email", plural: str = "emails") -> str:
    return f"{count} {singular if count == 1 else plural}"


class EmailAttachmentInline(admin.TabularInline):
    model = EmailAttachment
    extra = 0
    can_delete = False
    fields = ("filename", "content_type", "size", "content_id", "file")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


_DELIVERY_FIELDS = (
    "message_id",
    "provider_message_id",
    "delivery_status",
    "delivery_detail",
    "delivery_updated_at",
    "request_id",
    "resent_from",
)


@admin.register(Email)
class EmailAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "subject",
        "recipients",
        "template",
        "status",
        "delivery_status",
        "attempts",
        "created_at",
        "sent_at",
    )
    list_display_links = ("id", "subject")
    list_filter = ("status", "template", "delivery_status", "created_at")
    date_hierarchy = "created_at"
    search_fields = ("to", "subject", "=message_id", "=provider_message_id", "=request_id")
    show_full_result_count = False
    list_per_page = 100
    actions = ["resend_selected"]
    inlines = [EmailAttachmentInline]
    fieldsets = (
        (None, {"fields": ("status", "template", "from_email", "recipients", "subject", "attempts", "last_error")}),
        ("Rendered message", {"fields": ("rendered_text", "rendered_html")}),
        ("Context", {"fields": ("context",)}),
        ("Delivery", {"fields": _DELIVERY_FIELDS}),
        ("Times", {"fields": ("created_at", "handed_off_at", "sent_at", "updated_at")}),
        ("Dead letters", {"fields": ("dead_letters",)}),
    )
    readonly_fields = (
        "status",
        "template",
        "from_email",
        "recipients",
        "subject",
        "attempts",
        "last_error",
        "rendered_text",
        "rendered_html",
        "context",
        "message_id",
        "provider_message_id",
        "delivery_status",
        "delivery_detail",
        "delivery_updated_at",
        "request_id",
        "resent_from",
        "created_at",
        "handed_off_at",
        "sent_at",
        "updated_at",
        "dead_letters",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # emails are written by the mailer service only

    @admin.display(description="Dead letters of its sending")
    def dead_letters(self, obj: Email) -> str:
        return dead_letter_links(obj)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # what was sent is a record; the page is read-only

    def has_resend_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("mailer.change_email")

    @admin.display(description="to")
    def recipients(self, obj: Email) -> str:
        return ", ".join(obj.to)

    @admin.display(description="text part")
    def rendered_text(self, obj: Email) -> str:
        return format_html('<pre style="white-space:pre-wrap;max-width:80ch;">{}</pre>', obj.body_text)

    @admin.display(description="HTML part")
    def rendered_html(self, obj: Email) -> str:
        if not obj.body_html:
            return "-"
        # A sandboxed frame without allow-scripts: the message's HTML renders but cannot run code
        # or reach the admin's cookies.
        return format_html(
            '<iframe sandbox="" srcdoc="{}" title="HTML part" style="width:100%;max-width:720px;height:480px;'
            'border:1px solid #ccc;background:#fff;"></iframe>',
            obj.body_html,
        )

    @admin.action(description="Resend selected emails", permissions=["resend"])
    def resend_selected(self, request: HttpRequest, queryset: QuerySet[Email]) -> None:
        result = emails_resend(emails=queryset, actor=f"admin:{request.user.get_username()}")
        if result.requeued:
            self.message_user(request, f"Queued {_plural(len(result.requeued), 'failed email')} again.")
        if result.copied:
            ids = format_html_join(", ", "#{}", ((pk,) for pk in result.copied))
            self.message_user(
                request, format_html("Sent {} again as new emails: {}.", _plural(len(result.copied)), ids)
            )
        if result.skipped:
            self.message_user(
                request,
                f"Skipped {_plural(len(result.skipped))} still queued or being sent.",
                level=messages.WARNING,
            )

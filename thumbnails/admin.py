"""Admin: uploaded images with their thumbnails, and a way to make them again."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.translation import ngettext

from jobs.admin import dead_letter_links
from thumbnails import services
from thumbnails.models import Image, Thumbnail


class ThumbnailInline(admin.TabularInline):
    model = Thumbnail
    fields = ("size", "width", "height", "file", "preview")
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False

    @admin.display(description="Preview")
    def preview(self, obj: Thumbnail):
        return format_html('<img src="{}" width="{}" height="{}" alt="">', obj.file.url, obj.width, obj.height)


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    list_display = ("id", "preview", "format", "width", "height", "status", "created")
    list_display_links = ("id", "preview")
    list_filter = ("status", "format", "created")
    search_fields = ("original", "request_id", "error")
    date_hierarchy = "created"
    readonly_fields = (
        "original",
        "format",
        "width",
        "height",
        "status",
        "error",
        "request_id",
        "created",
        "updated",
        "dead_letters",
    )
    inlines = (ThumbnailInline,)
    actions = ("regenerate",)
    list_per_page = 50

    def get_queryset(self, request: HttpRequest) -> QuerySet[Image]:
        return super().get_queryset(request).prefetch_related("thumbnails")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # images arrive through uploads only

    @admin.display(description="Dead letters of its thumbnails")
    def dead_letters(self, obj: Image) -> str:
        return dead_letter_links(obj)

    @admin.display(description="Thumbnails")
    def preview(self, obj: Image):
        thumbs = sorted(obj.thumbnails.all(), key=lambda t: t.size)
        if not thumbs:
            return "-"
        smallest = thumbs[0]
        scale = min(1.0, 64 / max(smallest.width, smallest.height))
        return format_html(
            '<img src="{}" width="{}" height="{}" alt="" title="{}">',
            smallest.file.url,
            round(smallest.width * scale),
            round(smallest.height * scale),
            format_html_join(", ", "{} px", ((t.size,) for t in thumbs)),
        )

    @admin.action(description="Regenerate thumbnails", permissions=["change"])
    def regenerate(self, request: HttpRequest, queryset: QuerySet[Image]) -> None:
        count = services.images_regenerate(images=queryset)
        message = ngettext(
            "Queued thumbnails of %(count)d image again.",
            "Queued thumbnails of %(count)d images again.",
            count,
        ) % {"count": count}
        self.message_user(request, message, messages.SUCCESS)

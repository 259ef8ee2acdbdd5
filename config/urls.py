"""URL configuration."""

from django.conf import settings
from django.contrib import admin
from django.urls import include, path

from jobs import views as jobs_views

urlpatterns = [
    path("healthz", jobs_views.healthz, name="healthz"),
    path("readyz", jobs_views.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("", include("jobs.urls")),
    path("", include("thumbnails.urls")),
    path("", include("mailer.urls")),
]

handler400 = "jobs.http_errors.bad_request"
handler403 = "jobs.http_errors.permission_denied"
handler404 = "jobs.http_errors.page_not_found"
handler500 = "jobs.http_errors.server_error"

if settings.DEBUG:  # pragma: no cover - development convenience
    from django.conf.urls.static import static

    urlpatterns += static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT)

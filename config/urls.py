"""URL configuration."""

from django.conf import settings
from django.contrib import admin
from django.urls import include, path

from config import views

urlpatterns = [
    path("", views.home, name="home"),
    path("favicon.ico", views.favicon, name="favicon"),
    path("admin/", admin.site.urls),
    path("", include("jobs.urls")),
    path("", include("thumbnails.urls")),
    path("", include("mailer.urls")),
]

handler400 = "config.http_errors.bad_request"
handler403 = "config.http_errors.permission_denied"
handler404 = "config.http_errors.page_not_found"
handler500 = "config.http_errors.server_error"

if settings.SERVE_MEDIA:
    # Uploads and thumbnails on local disk, served by Django (small sites, compose, `make run`).
    # Behind a CDN, S3 (django-storages) or a web server that serves MEDIA_ROOT, set SERVE_MEDIA=false.
    from django.urls import re_path
    from django.views.static import serve

    def media(request, path):
        # MEDIA_ROOT read per request; `serve` refuses paths that leave it.
        return serve(request, path, document_root=settings.MEDIA_ROOT)

    urlpatterns += [re_path(rf"^{settings.MEDIA_URL.strip('/')}/(?P<path>.*)$", media)]

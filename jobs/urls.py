"""URL routes of this app (included at the site root by config/urls.py)."""

from django.urls import path  # noqa: F401 - routes are added as the app grows

urlpatterns: list = []

"""URL routes of this app (included at the site root by config/urls.py)."""

from django.urls import path

from thumbnails import views

app_name = "thumbnails"

urlpatterns = [
    path("thumbnails/", views.page, name="page"),
    path("api/thumbnails/", views.api_image_create, name="api-create"),
    path("api/thumbnails/<int:image_id>/", views.api_image_detail, name="api-detail"),
]

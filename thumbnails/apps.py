from django.apps import AppConfig


class ThumbnailsConfig(AppConfig):
    name = "thumbnails"
    verbose_name = "Thumbnails"
    default_auto_field = "django.db.models.BigAutoField"

from django.apps import AppConfig


class ThumbnailsConfig(AppConfig):
    name = "thumbnails"
    verbose_name = "Thumbnails"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from jobs.links import register_job_object
        from thumbnails import signals  # noqa: F401 - connects the file clean-up receivers

        register_job_object("thumbnails.generate", "thumbnails.Image", keyword="image_id")

from django.apps import AppConfig


class MailerConfig(AppConfig):
    name = "mailer"
    verbose_name = "Mailer"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from anymail.signals import tracking

        from mailer import tasks, webhooks  # noqa: F401 - registers the task and its worker signal

        tracking.connect(webhooks.on_tracking, dispatch_uid="mailer.tracking")

        from jobs.links import register_job_object

        register_job_object("mailer.send_email", "mailer.Email", keyword="email_id")
